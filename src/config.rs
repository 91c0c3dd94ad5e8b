//! Configuration: the TOML file as raw serde structs (unknown keys rejected), turned once
//! into validated [`Settings`] with paths resolved against the file's directory. Every
//! problem is collected and reported together, each with its location.

use crate::problem::{LoadError, Problem};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    peer: Option<RawPeer>,
    #[serde(default)]
    token: RawToken,
    #[serde(default, rename = "issuer")]
    issuers: Vec<RawIssuer>,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    response: RawResponse,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    audit: RawAudit,
    forward_auth: Option<RawForwardAuth>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    cache: RawCache,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_bytes: Option<usize>,
    max_headers: Option<usize>,
    max_header_bytes: Option<usize>,
    max_concurrent: Option<usize>,
    max_streams_per_connection: Option<u32>,
    request_timeout: Option<RawDuration>,
    max_http_connections: Option<usize>,
    http_header_timeout: Option<RawDuration>,
    strict_paths: Option<bool>,
    max_file_bytes: Option<u64>,
    http_body_timeout: Option<RawDuration>,
    tls_handshake_timeout: Option<RawDuration>,
    max_tls_handshakes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    tokens: Option<usize>,
    certificates: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForwardAuth {
    path: Option<String>,
    method_headers: Option<Vec<String>>,
    uri_headers: Option<Vec<String>>,
    host_headers: Option<Vec<String>>,
    proto_headers: Option<Vec<String>>,
    source_headers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    grpc: Option<String>,
    http: Option<String>,
    mode: Option<String>,
    shutdown_grace: Option<RawDuration>,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    audit: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    disk_full_action: Option<String>,
    disk_error_action: Option<String>,
    fsync: Option<String>,
    rotate_size: Option<RawSize>,
    rotate_keep: Option<usize>,
    format: Option<String>,
    chain: Option<bool>,
    signing_key: Option<PathBuf>,
    checkpoint_every: Option<u64>,
    checkpoint_interval: Option<RawDuration>,
    syslog: Option<RawSyslog>,
    record_requests: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyslog {
    address: String,
    server_name: Option<String>,
    ca: PathBuf,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    spool_dir: PathBuf,
    spool_max: Option<RawSize>,
    app_name: Option<String>,
    facility: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    trust_bundle: PathBuf,
    intermediates: Option<PathBuf>,
    #[serde(default)]
    trust_domains: Vec<String>,
    #[serde(default)]
    require: bool,
    max_size: Option<usize>,
    max_request_intermediates: Option<usize>,
    #[serde(default)]
    crls: Vec<PathBuf>,
    header: Option<String>,
    xfcc: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    max_size: Option<usize>,
    revoked: Option<PathBuf>,
    header: Option<String>,
    cookie: Option<String>,
    #[serde(default)]
    pass_schemes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    jwks_file: Option<PathBuf>,
    #[serde(default)]
    pem_keys: Vec<RawPemKey>,
    jwks_uri: Option<String>,
    #[serde(default)]
    discovery: bool,
    ca_bundle: Option<PathBuf>,
    refresh_min: Option<RawDuration>,
    refresh_max: Option<RawDuration>,
    fetch_timeout: Option<RawDuration>,
    max_key_set_size: Option<usize>,
    unknown_kid_interval: Option<RawDuration>,
    unknown_kid_wait: Option<RawDuration>,
    max_staleness: Option<RawDuration>,
    required_at_start: Option<bool>,
    algorithms: Option<Vec<String>>,
    leeway: Option<RawDuration>,
    max_lifetime: Option<RawDuration>,
    #[serde(default)]
    required_claims: Vec<String>,
    typ: Option<String>,
    #[serde(default)]
    require_binding: bool,
    groups_claim: Option<String>,
    id_prefix: Option<String>,
    #[serde(default)]
    claim_headers: std::collections::BTreeMap<String, String>,
    /// `[issuer.claims]`: claim name -> Cedar type (checked as read, so a bad type has its line).
    #[serde(default)]
    claims: std::collections::BTreeMap<String, crate::declared::ClaimType>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPemKey {
    path: PathBuf,
    kid: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    dir: Option<PathBuf>,
    schema: Option<PathBuf>,
    entities: Option<PathBuf>,
    /// Checked as read, so an unknown zone has its line.
    time_zone: Option<crate::declared::TimeZoneSetting>,
    shadow_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResponse {
    principal_header: Option<String>,
    #[serde(default)]
    claim_headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    strip_authorization: bool,
}

/// Whether denials are enforced or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Denials are denied (the default).
    Enforce,
    /// Denials are allowed, and reported as dry-run denials (header, metadata, audit).
    DryRun,
}

/// Validated settings: every path absolute or relative to the working directory,
/// every duration parsed, every default applied.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the gRPC door listens (`[server] grpc`).
    pub grpc_listen: Listen,
    /// The forward-auth door on the HTTP listener, if configured.
    pub forward_auth: Option<ForwardAuthSettings>,
    /// TLS for the gRPC listener; with `client_ca`, the proxy must present a certificate.
    pub tls: Option<TlsSettings>,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Where audit lines go (`[log] audit`) and how they are kept (`[audit]`).
    pub audit: AuditSettings,
    /// The admin HTTP listener (`/healthz`, `/readyz`, `/metrics`), if any.
    pub http_listen: Option<String>,
    /// Whether denials are enforced (`[server] mode`).
    pub mode: Mode,
    /// Client certificate verification (`[peer]`), if configured.
    pub peer: Option<PeerSettings>,
    /// Where bearer tokens are read and how large they may be (`[token]`).
    pub token: TokenSettings,
    /// The trusted token issuers (`[[issuer]]`).
    pub issuers: Vec<IssuerSettings>,
    /// The Cedar policies, schema and entities (`[policy]`).
    pub policy: PolicySettings,
    /// What an allow sends upstream (`[response]`).
    pub response: ResponseSettings,
    /// Bounds on requests, connections and files (`[limits]`).
    pub limits: Limits,
    /// Verification cache sizes (`[cache]`).
    pub cache: CacheSettings,
    /// A candidate policy directory evaluated beside the live one, never enforced
    /// (`[policy] shadow_dir`).
    pub shadow_dir: Option<PathBuf>,
    /// Where the configuration named each file, for problems found reading them.
    origin: Origin,
}

/// The configuration file and where it names each file, so that a problem found reading
/// one (a missing key file) points at the key that names it.
#[derive(Debug, Clone, Default)]
struct Origin {
    /// The configuration file, when it was read from one.
    config: Option<PathBuf>,
    /// Each file named, resolved, with the line and column of its key.
    files: Vec<(PathBuf, (usize, usize))>,
}

/// Bounds on what one request, one connection and the whole server may take (`[limits]`).
/// Past a bound a request is denied (only a message over the transport's hard cap of
/// four times `max_message_bytes` is refused as a gRPC error, since no CheckRequest could
/// be read); nothing queues without bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest CheckRequest decided; a larger one (up to four times this, the transport's
    /// hard cap) is denied as `request_too_large`.
    pub max_message_bytes: usize,
    /// Most request headers in one request.
    pub max_headers: usize,
    /// Most bytes of header names and values in one request.
    pub max_header_bytes: usize,
    /// Most requests being decided at once; more are denied at once as `overloaded`.
    pub max_concurrent: usize,
    /// Most concurrent HTTP/2 streams on one gRPC connection.
    pub max_streams_per_connection: u32,
    /// The longest a decision may take, reading the request included: checked between its
    /// stages and while a key refresh is awaited; past it, `deadline`.
    pub request_timeout: Duration,
    /// Most open connections on the HTTP listener; more wait in the kernel's backlog.
    pub max_http_connections: usize,
    /// The longest an HTTP client may take to send a request's headers (also the longest an
    /// idle keep-alive connection is kept); past it, the connection is closed.
    pub http_header_timeout: Duration,
    /// Refuse paths an upstream could decode into a different path (double encoding,
    /// overlong UTF-8, encoded NUL, NFKC-unstable or invisible characters).
    pub strict_paths: bool,
    /// Largest operator file read (policies, schema, entities, keys, trust material, the
    /// revocation list); a larger one is refused with a clear error.
    pub max_file_bytes: u64,
    /// The longest an HTTP client may take to send a request's body, once its headers are
    /// in; past it, 408 and the connection is closed.
    pub http_body_timeout: Duration,
    /// The longest a client of the TLS gRPC listener may take to finish its handshake.
    pub tls_handshake_timeout: Duration,
    /// Most TLS handshakes in progress at once on the gRPC listener, apart from the
    /// established connections; when all are taken, a new connection takes the place of the
    /// handshake stalled the longest.
    pub max_tls_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1024 * 1024,
            max_headers: 256,
            max_header_bytes: 96 * 1024,
            max_concurrent: 1024,
            max_streams_per_connection: 1024,
            request_timeout: Duration::from_millis(180),
            max_http_connections: 1024,
            http_header_timeout: Duration::from_secs(10),
            strict_paths: true,
            max_file_bytes: crate::files::DEFAULT_MAX_BYTES,
            http_body_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(5),
            max_tls_handshakes: 256,
        }
    }
}

/// Sizes of the verification caches (`[cache]`); 0 turns a cache off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// Verified tokens, by SHA-256 of the token.
    pub tokens: usize,
    /// Verified certificates, by SHA-256 of the presented certificate text.
    pub certificates: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            tokens: 10_000,
            certificates: 10_000,
        }
    }
}

/// Where the gRPC door listens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Listen {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// `unix:/path/to.sock`
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// TLS for the gRPC listener (`[server.tls]`).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The listener's certificate chain (PEM), reloaded when it changes.
    pub cert: PathBuf,
    /// The listener's private key (PEM).
    pub key: PathBuf,
    /// With it, the proxy must present a certificate issued by one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// Where audit lines (one JSON object per decision) go.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditSink {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A file, appended to.
    File(PathBuf),
}

/// What to do with a decision whose audit line cannot be written (`[audit]
/// disk_full_action`, `disk_error_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditFailureAction {
    /// Deny it (`audit_unavailable`): nothing is answered allow without its record. The
    /// default.
    Deny,
    /// Answer it as decided and count the line as dropped.
    Serve,
}

/// When audit lines are forced to stable storage (`[audit] fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditFsync {
    /// Never: a line is in the kernel (a completed `write`) before its reply, which survives
    /// the process being killed, not the host crashing. The default.
    Never,
    /// Before each reply: survives a host crash.
    Always,
    /// At most this long after a line was written.
    Every(Duration),
}

/// The audit line's shape (`[audit] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditFormat {
    /// Portcullis's own JSON (docs/AUDIT.md).
    Json,
    /// Elastic Common Schema 8 fields.
    Ecs,
}

/// How audit lines are kept: what a write failure does, durability, rotation, format,
/// tamper evidence and shipping (`[log] audit` and `[audit]`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditSettings {
    /// Where lines go.
    pub sink: AuditSink,
    /// When the storage is full (`ENOSPC`, `EDQUOT`, a full syslog spool).
    pub disk_full_action: AuditFailureAction,
    /// On any other write error.
    pub disk_error_action: AuditFailureAction,
    /// When lines are forced to stable storage.
    pub fsync: AuditFsync,
    /// Built-in rotation: past this many bytes the file is renamed `FILE.1` (and older
    /// ones shifted) and a new one started. `None`: no built-in rotation (logrotate).
    pub rotate_size: Option<u64>,
    /// How many rotated files are kept.
    pub rotate_keep: usize,
    /// The line's shape.
    pub format: AuditFormat,
    /// Whether each line carries `seq` and `prev` (the SHA-256 of the line before).
    pub chain: bool,
    /// An Ed25519 private key (PKCS#8 PEM) signing periodic checkpoints of the chain.
    pub signing_key: Option<PathBuf>,
    /// A checkpoint after this many lines.
    pub checkpoint_every: u64,
    /// A checkpoint at least this often while lines are written.
    pub checkpoint_interval: Duration,
    /// Shipping to a syslog receiver over TLS (RFC 5424 over RFC 5425).
    pub syslog: Option<SyslogSettings>,
    /// Whether each decision's line records the Cedar request it evaluated (principal,
    /// parents, action, resource, full context), for `portcullis replay`.
    pub record_requests: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            sink: AuditSink::Stdout,
            disk_full_action: AuditFailureAction::Deny,
            disk_error_action: AuditFailureAction::Deny,
            fsync: AuditFsync::Never,
            rotate_size: None,
            rotate_keep: DEFAULT_AUDIT_ROTATE_KEEP,
            format: AuditFormat::Json,
            chain: true,
            signing_key: None,
            checkpoint_every: DEFAULT_AUDIT_CHECKPOINT_EVERY,
            checkpoint_interval: DEFAULT_AUDIT_CHECKPOINT_INTERVAL,
            syslog: None,
            record_requests: false,
        }
    }
}

/// A syslog receiver over TLS (`[audit.syslog]`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyslogSettings {
    /// `host:port` of the receiver (6514 is RFC 5425's port).
    pub address: String,
    /// The name the receiver's certificate must carry; the host of `address` by default.
    pub server_name: String,
    /// The CA certificates (PEM) the receiver's certificate must chain to.
    pub ca: PathBuf,
    /// This client's certificate chain (PEM), for receivers that require one.
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM).
    pub key: Option<PathBuf>,
    /// Where lines wait until the receiver has them.
    pub spool_dir: PathBuf,
    /// The most the spool may hold; past it the spool is full (`disk_full_action`).
    pub spool_max: u64,
    /// The APP-NAME of each message.
    pub app_name: String,
    /// The facility of each message (a number, 0 to 23; 13 is "log audit").
    pub facility: u8,
}

/// Where bearer tokens are read (`[token]`).
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// Largest token accepted, in bytes; a larger one is rejected before parsing.
    pub max_size: usize,
    /// The revocation list, reloaded when it changes.
    pub revoked: Option<PathBuf>,
    /// A header carrying the token (raw, or with a `Bearer ` prefix), after `Authorization`.
    pub header: Option<String>,
    /// A cookie carrying the token, tried last.
    pub cookie: Option<String>,
    /// `Authorization` schemes other than Bearer that may pass through unverified (lower
    /// case, e.g. "basic"); any other scheme fails the request.
    pub pass_schemes: Vec<String>,
}

/// What an allow sends upstream (`[response]`).
#[derive(Debug, Clone)]
pub struct ResponseSettings {
    /// The header that carries the Cedar principal upstream.
    pub principal_header: String,
    /// By issuer: upstream header name -> claim name; scalar claims only. A token's claims
    /// fill only its own issuer's headers.
    pub claim_headers: std::collections::BTreeMap<String, Vec<(String, String)>>,
    /// Every claim header name of every issuer: removed upstream when the deciding token's
    /// issuer did not set it.
    pub claim_header_names: Vec<String>,
    /// Remove `Authorization` (and the configured token header) before the request goes on.
    pub strip_authorization: bool,
    /// `[token] header`, if configured.
    pub token_header: Option<String>,
    /// `[token] cookie`, if configured.
    pub token_cookie: Option<String>,
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// A JWKS file and/or PEM public keys, loaded at start-up.
    Files,
    /// A JWKS URL, fetched and refreshed in the background.
    JwksUri(String),
    /// OIDC discovery: `<issuer>/.well-known/openid-configuration` names the JWKS URL.
    Discovery,
}

/// How remote key sets are fetched and kept.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// CA certificates for the key server's TLS, instead of the system's roots.
    pub ca_bundle: Option<PathBuf>,
    /// Shortest time between two refreshes, whatever the server's cache headers say.
    pub refresh_min: Duration,
    /// Longest time between two refreshes.
    pub refresh_max: Duration,
    /// The longest one fetch may take.
    pub timeout: Duration,
    /// Largest key set document accepted, in bytes.
    pub max_size: usize,
    /// Shortest time between two early refreshes asked for by a token with an unknown `kid`.
    pub unknown_kid_interval: Duration,
    /// The longest a request waits for such an early refresh.
    pub unknown_kid_wait: Duration,
    /// The longest keys are used after the last successful fetch; past it, tokens are rejected.
    pub max_staleness: Duration,
    /// Whether the server is not ready until the first fetch succeeds.
    pub required_at_start: bool,
}

/// Client certificate verification (`[peer]`).
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// The CA certificates client certificates must chain to (PEM).
    pub trust_bundle: PathBuf,
    /// Intermediate CA certificates to build paths with (PEM).
    pub intermediates: Option<PathBuf>,
    /// SPIFFE trust domains accepted; empty accepts any trust domain the bundle vouches for.
    pub trust_domains: Vec<String>,
    /// Whether a request without a client certificate is denied.
    pub require: bool,
    /// Cap on the URL-encoded PEM as received, checked before decoding.
    pub max_size: usize,
    /// Most intermediates one request may bring with its certificate (Traefik's chain,
    /// XFCC `Chain`; a copy of the leaf does not count); more is refused before any path
    /// building.
    pub max_request_intermediates: usize,
    /// Certificate revocation lists (PEM or DER), checked for every certificate in the path.
    pub crls: Vec<PathBuf>,
    /// A header carrying the client certificate as URL-encoded PEM (nginx's
    /// `$ssl_client_escaped_cert`), trusted because the proxy always sets it.
    pub header: Option<String>,
    /// Whether to take the certificate from `x-forwarded-client-cert`.
    pub xfcc: XfccMode,
}

/// Trust in `x-forwarded-client-cert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum XfccMode {
    /// Ignored, even when a client sends one.
    Off,
    /// The element of the nearest hop (the last one) is used.
    Nearest,
}

/// The HTTP forward-auth door (nginx `auth_request`, Traefik `forwardAuth`, Caddy
/// `forward_auth`, Envoy's HTTP ext_authz): where the original request's facts are read.
#[derive(Debug, Clone)]
pub struct ForwardAuthSettings {
    /// The path the door answers on, on the HTTP listener.
    pub path: String,
    /// Headers carrying the original method. Each list is tried in order; the first
    /// header present wins.
    pub method_headers: Vec<String>,
    /// Headers carrying the original URI (path and query).
    pub uri_headers: Vec<String>,
    /// Headers carrying the original host.
    pub host_headers: Vec<String>,
    /// Headers carrying the original scheme.
    pub proto_headers: Vec<String>,
    /// Headers carrying the original client address.
    pub source_headers: Vec<String>,
}

/// One trusted token issuer (`[[issuer]]`).
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// The `iss` value its tokens carry.
    pub issuer: String,
    /// Audiences accepted; a token must name at least one.
    pub audiences: Vec<String>,
    /// Where its keys come from.
    pub source: KeySource,
    /// A JWKS file of its keys.
    pub jwks_file: Option<PathBuf>,
    /// PEM public keys, each with the `kid` it answers to, if any.
    pub pem_keys: Vec<(PathBuf, Option<String>)>,
    /// How remote key sets are fetched.
    pub fetch: FetchSettings,
    /// Signature algorithms accepted (public-key only).
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Longest `exp - iat` accepted.
    pub max_lifetime: Duration,
    /// Claims a token must carry.
    pub required_claims: Vec<String>,
    /// The `typ` header a token must carry, if any.
    pub typ: Option<String>,
    /// Whether a token must be bound to the request's certificate (RFC 8705 `cnf`).
    pub require_binding: bool,
    /// The claim that lists the user's groups.
    pub groups_claim: String,
    /// Prefixed to subjects and groups, so that two issuers' ids never meet.
    pub id_prefix: String,
    /// Upstream header name -> claim name, for this issuer's tokens only.
    pub claim_headers: Vec<(String, String)>,
    /// The claims policies may read in `context.token.claims`, with their Cedar types
    /// (`[issuer.claims]`); a token whose declared claim has another type is rejected.
    pub claims: Vec<(String, crate::declared::ClaimType)>,
}

/// The Cedar policies, schema and entities (`[policy]`).
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// The directory of `*.cedar` files.
    pub dir: PathBuf,
    /// A Cedar schema; with it, policies are validated strictly at load.
    pub schema: Option<PathBuf>,
    /// Static entities (Cedar JSON), such as groups and their parents.
    pub entities: Option<PathBuf>,
    /// Request headers policies never see besides `authorization`, `proxy-authorization`
    /// and `cookie`: the configured token header, which carries a credential.
    pub hidden_headers: Vec<String>,
    /// The zone of `context.time`'s local fields (`[policy] time_zone`, UTC by default).
    pub time_zone: crate::declared::TimeZoneSetting,
    /// The claims each issuer declares (`[issuer.claims]`): with a schema, the only claims
    /// in `context.token.claims`. `None` when no configuration says (`portcullis test` of a
    /// bare directory): then every claim is there, as without a schema.
    pub declared_claims: Option<crate::declared::DeclaredClaims>,
}

/// `[server] grpc` by default.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:9191";
/// `[server] shutdown_grace` by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// `[token] max_size` by default.
pub const DEFAULT_TOKEN_MAX_SIZE: usize = 8 * 1024;
/// `[peer] max_size` by default.
pub const DEFAULT_CERT_MAX_SIZE: usize = 32 * 1024;
/// `[peer] max_request_intermediates` by default.
pub const DEFAULT_MAX_REQUEST_INTERMEDIATES: usize = 4;
/// The largest `[peer] max_request_intermediates`: webpki builds paths of at most six
/// intermediates, so more could never help a path and would only widen its search.
pub const MAX_REQUEST_INTERMEDIATES: usize = 6;
/// An issuer's `leeway` by default.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The largest `leeway` accepted.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// An issuer's `max_lifetime` by default.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// `[response] principal_header` by default.
pub const DEFAULT_PRINCIPAL_HEADER: &str = "x-portcullis-principal";
/// `refresh_min` of a fetched key set by default.
pub const DEFAULT_REFRESH_MIN: Duration = Duration::from_secs(60);
/// `refresh_max` of a fetched key set by default.
pub const DEFAULT_REFRESH_MAX: Duration = Duration::from_secs(3600);
/// `timeout` of a key set fetch by default.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// `max_size` of a fetched key set by default.
pub const DEFAULT_MAX_KEY_SET_SIZE: usize = 256 * 1024;
/// `unknown_kid_interval` by default.
pub const DEFAULT_UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(30);
/// `unknown_kid_wait` by default.
pub const DEFAULT_UNKNOWN_KID_WAIT: Duration = Duration::from_millis(150);
/// `max_staleness` by default.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(12 * 3600);
/// Rotated audit files kept by the built-in rotation.
const DEFAULT_AUDIT_ROTATE_KEEP: usize = 5;
/// Audit lines between signed checkpoints.
const DEFAULT_AUDIT_CHECKPOINT_EVERY: u64 = 1000;
/// The longest time between signed checkpoints while lines are written.
const DEFAULT_AUDIT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
/// The most a syslog spool holds by default.
const DEFAULT_SYSLOG_SPOOL_MAX: u64 = 256 * 1024 * 1024;
const DEFAULT_ALGORITHMS: &[&str] = &["RS256", "ES256", "EdDSA"];

impl Settings {
    /// Reads and validates a configuration file.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("portcullis.toml");
    /// std::fs::write(&path, "[policy]\ndir = \"policies\"\n[limits]\nmax_concurent = 8\n")?;
    /// let error = portcullis::Settings::load(&path).unwrap_err();
    /// let problem = &error.problems()[0];
    /// assert_eq!(problem.line(), Some(4)); // where the unknown key is
    /// assert!(problem.message().contains("max_concurent"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load(path: &Path) -> Result<Settings, LoadError> {
        let what = format!("in configuration {}", path.display());
        // The configuration names the cap for every other file; its own read has the default.
        let text = crate::files::read_to_string(path)
            .map_err(|e| LoadError::new(what.clone(), vec![Problem::new(e.to_string())]))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut settings = Settings::parse(&text, base).map_err(|problems| {
            let problems = problems.into_iter().map(|p| p.in_file(path)).collect();
            LoadError::new(what, problems)
        })?;
        settings.origin.config = Some(path.to_path_buf());
        Ok(settings)
    }

    /// A problem found reading a file this configuration names, placed at the key that
    /// names it (`portcullis.toml:7:1: issuer "...": keys.json: cannot read: ...`); a
    /// problem that has a place of its own (a policy's line) is returned as it is.
    pub(crate) fn place(&self, problem: Problem) -> Problem {
        if problem.file().is_some() || problem.line().is_some() {
            return problem;
        }
        // The longest match: `policies/a.cedar` rather than `policies`.
        let named = self
            .origin
            .files
            .iter()
            .filter(|(file, _)| names(problem.message(), &file.to_string_lossy()))
            .max_by_key(|(file, _)| file.as_os_str().len());
        let Some((_, (line, column))) = named else {
            return problem;
        };
        let placed = problem.at(*line, *column);
        match &self.origin.config {
            Some(config) => placed.in_file(config),
            None => placed,
        }
    }

    /// Parses TOML text; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Settings, LoadError> {
        Settings::parse(text, base).map_err(|problems| LoadError::new("in configuration", problems))
    }

    fn parse(text: &str, base: &Path) -> Result<Settings, Vec<Problem>> {
        let spans = Spans::index(text).map_err(|p| vec![p])?;
        let Deserialized {
            raw,
            mut problems,
            removed,
            dropped,
        } = deserialize(text, &spans);
        // Without the raw structs there is nothing to validate: too many problems, or one
        // whose key could not be taken out.
        let Some(raw) = raw else {
            return Err(problems);
        };
        let mut found = Found {
            spans: &spans,
            removed,
            dropped,
            problems: Vec::new(),
            files: Vec::new(),
        };
        let mut settings = validate(raw, base, &mut found);
        settings.origin.files = found.files;
        problems.extend(found.problems);
        // In the file's order; problems of the whole file last.
        problems.sort_by_key(|p| p.line().unwrap_or(usize::MAX));
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(problems)
        }
    }
}

/// Whether a problem's message is about `file`: it names it first (`FILE: ...`), or after
/// a space (`issuer "x": FILE: ...`); not when it names a line in it (`FILE:2: ...`), a
/// place of its own.
fn names(message: &str, file: &str) -> bool {
    if file.is_empty() {
        return false;
    }
    let at = format!("{file}:");
    let after = match message.strip_prefix(&at) {
        Some(rest) => rest,
        None => match message.split_once(&format!(" {at}")) {
            Some((_, rest)) => rest,
            None => return false,
        },
    };
    !after.starts_with(|c: char| c.is_ascii_digit())
}

/// Most problems the deserialization passes report: each pass finds one, and its key is
/// taken out for the next pass.
const MAX_DESERIALIZE_PROBLEMS: usize = 50;

/// Deserializes the raw structs, reporting every unknown key, every value of the wrong
/// type and every missing required key, not only the first: serde stops at the first
/// error, so each error's key is recorded, taken out of the table (a table missing a
/// required key is taken out whole), and the table deserialized again. Returns the raw
/// structs when a pass succeeds, the problems, and the paths taken out (what validation
/// would say of them is an echo).
fn deserialize(text: &str, spans: &Spans<'_>) -> Deserialized {
    let mut table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            return Deserialized {
                raw: None,
                problems: vec![toml_error(text, &e)],
                removed: Vec::new(),
                dropped: Vec::new(),
            };
        }
    };
    let mut problems = Vec::new();
    let mut removed = Vec::new();
    // Elements taken out of arrays: (the array's path, the element's index in the file),
    // so that the indices of later errors are turned back into the file's.
    let mut dropped: Vec<(String, usize)> = Vec::new();
    for _ in 0..MAX_DESERIALIZE_PROBLEMS {
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(table.clone()) {
            Ok(raw) => {
                return Deserialized {
                    raw: Some(raw),
                    problems,
                    removed,
                    dropped,
                };
            }
            Err(e) => e,
        };
        let mut segments = Vec::new();
        for segment in error.path() {
            match segment {
                serde_path_to_error::Segment::Map { key } => segments.push(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => segments.push(Seg::Index(*index)),
                // Not in this configuration's types (no enums, no unknown segments).
                _ => {
                    return Deserialized {
                        raw: None,
                        problems,
                        removed,
                        dropped,
                    };
                }
            }
        }
        let keys: Vec<&str> = segments
            .iter()
            .filter_map(|s| match s {
                Seg::Key(k) => Some(k.as_str()),
                Seg::Index(_) => None,
            })
            .collect();
        let message = error.inner().message();
        let missing = message.starts_with("missing field `");
        let path = file_path(&path_text(&segments), &dropped);
        problems.push(spans.locate(&path, Problem::new(describe(&keys, message))));
        // What is taken out: a table missing a key, whole; else the key in error (a whole
        // array for one of its elements).
        let target = if missing {
            segments.len()
        } else {
            match segments.iter().rposition(|s| matches!(s, Seg::Key(_))) {
                Some(last) => last + 1,
                None => {
                    return Deserialized {
                        raw: None,
                        problems,
                        removed,
                        dropped,
                    };
                }
            }
        };
        if target == 0 || take_out(&mut table, &segments[..target]).is_none() {
            return Deserialized {
                raw: None,
                problems,
                removed,
                dropped,
            };
        }
        let taken = file_path(&path_text(&segments[..target]), &dropped);
        if let Some(Seg::Index(_)) = segments.get(target - 1) {
            let array = file_path(&path_text(&segments[..target - 1]), &dropped);
            let index = taken
                .strip_prefix(&format!("{array}["))
                .and_then(|rest| rest.trim_end_matches(']').parse().ok());
            match index {
                Some(index) => dropped.push((array, index)),
                None => {
                    return Deserialized {
                        raw: None,
                        problems,
                        removed,
                        dropped,
                    };
                }
            }
        }
        removed.push(taken);
    }
    problems.push(Problem::new(format!(
        "more than {MAX_DESERIALIZE_PROBLEMS} problems: fix these and validate again"
    )));
    Deserialized {
        raw: None,
        problems,
        removed,
        dropped,
    }
}

/// What the deserialization passes found.
struct Deserialized {
    /// The raw structs, when a pass succeeded.
    raw: Option<RawConfig>,
    problems: Vec<Problem>,
    /// The paths taken out, as the file has them.
    removed: Vec<String>,
    /// The array elements taken out: (the array's path, the element's index in the file).
    dropped: Vec<(String, usize)>,
}

/// A path of validation's (`issuer[1].leeway`) as the file has it: the array elements
/// taken out before are counted back in.
fn file_path(path: &str, dropped: &[(String, usize)]) -> String {
    let mut path = path.to_string();
    let mut arrays: Vec<&str> = dropped.iter().map(|(a, _)| a.as_str()).collect();
    arrays.sort_by_key(|a| a.len());
    arrays.dedup();
    for array in arrays {
        let Some(rest) = path.strip_prefix(&format!("{array}[")) else {
            continue;
        };
        let Some((digits, tail)) = rest.split_once(']') else {
            continue;
        };
        let Ok(mut index) = digits.parse::<usize>() else {
            continue;
        };
        let mut gone: Vec<usize> = dropped
            .iter()
            .filter(|(a, _)| a == array)
            .map(|(_, i)| *i)
            .collect();
        gone.sort_unstable();
        for g in gone {
            if g <= index {
                index += 1;
            }
        }
        path = format!("{array}[{index}]{tail}");
    }
    path
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A path as `serde_path_to_error` writes it: `issuer[1].leeway`.
fn path_text(segments: &[Seg]) -> String {
    let mut path = String::new();
    for segment in segments {
        match segment {
            Seg::Key(key) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Seg::Index(index) => path.push_str(&format!("[{index}]")),
        }
    }
    path
}

/// Takes the value at `segments` (a key, or an element of an array) out of the table.
fn take_out(table: &mut toml::Table, segments: &[Seg]) -> Option<toml::Value> {
    let (last, parents) = segments.split_last()?;
    let mut here: Option<&mut toml::Value> = None;
    let mut root = Some(table);
    for segment in parents {
        let next = match (segment, here.take(), root.take()) {
            (Seg::Key(key), None, Some(t)) => t.get_mut(key.as_str())?,
            (Seg::Key(key), Some(v), None) => v.as_table_mut()?.get_mut(key.as_str())?,
            (Seg::Index(i), Some(v), None) => v.as_array_mut()?.get_mut(*i)?,
            _ => return None,
        };
        here = Some(next);
    }
    match (last, here, root) {
        (Seg::Key(key), None, Some(t)) => t.remove(key.as_str()),
        (Seg::Key(key), Some(v), None) => v.as_table_mut()?.remove(key.as_str()),
        (Seg::Index(i), Some(v), None) => {
            let array = v.as_array_mut()?;
            (*i < array.len()).then(|| array.remove(*i))
        }
        _ => None,
    }
}

/// The table a key path is in, as the file writes its header: `[issuer]` for
/// `issuer[0].leeway`, `[audit.syslog]` for `audit.syslog.facility`.
fn table_of(keys: &[&str]) -> String {
    match keys.split_last() {
        Some((_, [])) | None => "the top level".to_string(),
        Some((_, parents)) => format!("[{}]", parents.join(".")),
    }
}

/// A deserialization error as a sentence naming the key and the fix.
fn describe(keys: &[&str], message: &str) -> String {
    let message = message.trim_end_matches('\n');
    let table = table_of(keys);
    let key = keys.last().copied().unwrap_or_default();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        return unknown_key(name, &table, &valid);
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        // The path is the table itself.
        let at = if keys.is_empty() {
            "the top level".to_string()
        } else {
            format!("[{}]", keys.join("."))
        };
        return format!("{at} is missing the required key `{field}`");
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((found, expected)) = message
            .strip_prefix(prefix)
            .and_then(|r| r.split_once(", expected "))
        {
            return format!("{table} {key}: expected {expected}, found {found}");
        }
    }
    format!("{table} {key}: {message}")
}

/// Where an operator finds every key, named when an unknown key is not close to one.
const CONFIG_REFERENCE: &str = "docs/CONFIGURATION.md";

/// `unknown key `levway` in [issuer]; did you mean `leeway`?`: the closest valid name
/// when it is close, else the valid names when they are few, else the reference.
fn unknown_key(name: &str, table: &str, valid: &[&str]) -> String {
    let shown: String = name.chars().take(64).collect();
    let closest = valid
        .iter()
        .map(|v| (strsim::damerau_levenshtein(name, v), *v))
        .min();
    let hint = match closest {
        // Close: at most a third of the name's letters differ (two for short names).
        Some((d, v)) if d <= (v.chars().count() / 3).max(2) => format!("did you mean `{v}`?"),
        _ if !valid.is_empty() && valid.len() <= 6 => format!(
            "valid keys: {}",
            valid
                .iter()
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => format!("see {CONFIG_REFERENCE} for the valid keys"),
    };
    format!("unknown key `{shown}` in {table}; {hint}")
}

/// Where each key of the file is: its path as `serde_path_to_error` writes it
/// (`issuer[0].leeway`) to the byte offset of the key (of the value, for an element of
/// an array).
struct Spans<'t> {
    text: &'t str,
    at: std::collections::HashMap<String, usize>,
}

impl<'t> Spans<'t> {
    /// Parses the text once for positions; a syntax error is the one problem.
    fn index(text: &'t str) -> Result<Spans<'t>, Problem> {
        let doc = toml::de::DeTable::parse(text).map_err(|e| toml_error(text, &e))?;
        let mut spans = Spans {
            text,
            at: std::collections::HashMap::new(),
        };
        spans.walk_table(doc.get_ref(), "");
        Ok(spans)
    }

    fn walk_table(&mut self, table: &toml::de::DeTable<'_>, prefix: &str) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            self.at.insert(path.clone(), key.span().start);
            self.walk_value(value.get_ref(), &path);
        }
    }

    fn walk_value(&mut self, value: &toml::de::DeValue<'_>, path: &str) {
        match value {
            toml::de::DeValue::Table(t) => self.walk_table(t, path),
            toml::de::DeValue::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    self.at.insert(path.clone(), v.span().start);
                    self.walk_value(v.get_ref(), &path);
                }
            }
            _ => {}
        }
    }

    /// The problem, at the line of `path`, or of the nearest key that holds it (a missing
    /// key is reported where its table is).
    fn locate(&self, path: &str, problem: Problem) -> Problem {
        match self.position(path) {
            Some((line, column)) => problem.at(line, column),
            None => problem,
        }
    }

    /// The line and column of `path`, or of the nearest key that holds it.
    fn position(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(&offset) = self.at.get(p) {
                return Some(line_col(self.text, offset));
            }
            p = &p[..p.rfind(['.', '['])?];
        }
    }
}

/// The problems validation finds, each at the line of its key.
struct Found<'s> {
    spans: &'s Spans<'s>,
    /// Keys taken out after a deserialization problem: what validation says of them
    /// (a default where a value was) would be an echo.
    removed: Vec<String>,
    /// Array elements taken out: validation counts the others from 0, the file does not.
    dropped: Vec<(String, usize)>,
    problems: Vec<Problem>,
    /// Every file the configuration names, resolved, and where.
    files: Vec<(PathBuf, (usize, usize))>,
}

impl Found<'_> {
    /// The index in the file of element `i` of the array at `array`, as validation sees it.
    fn index_in_file(&self, array: &str, i: usize) -> usize {
        file_path(&format!("{array}[{i}]"), &self.dropped)
            .strip_prefix(&format!("{array}["))
            .and_then(|rest| rest.trim_end_matches(']').parse().ok())
            .unwrap_or(i)
    }

    /// The file named at `path`, resolved against `base`; remembered with its position,
    /// for a later problem with the file to point at the key that names it.
    fn file(&mut self, base: &Path, file: PathBuf, path: &str) -> PathBuf {
        let file = resolve(base, file);
        let path = &file_path(path, &self.dropped);
        if let Some(position) = self.spans.position(path) {
            self.files.push((file.clone(), position));
        }
        file
    }

    /// A problem with the key at `path` (`issuer[0].leeway`, `server.mode`), or with the
    /// table at `path` when the key is missing.
    fn push(&mut self, path: &str, message: impl Into<String>) {
        let path = &file_path(path, &self.dropped);
        let echo = self.removed.iter().any(|r| {
            path == r || path.starts_with(&format!("{r}.")) || path.starts_with(&format!("{r}["))
        });
        if !echo {
            let problem = self.spans.locate(path, Problem::new(message));
            self.problems.push(problem);
        }
    }
}

/// A TOML syntax error, at its line.
fn toml_error(text: &str, e: &toml::de::Error) -> Problem {
    let problem = Problem::new(e.message().trim_end_matches('\n'));
    match e.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            problem.at(line, col)
        }
        None => problem,
    }
}

/// One-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

/// A duration written as a human string (`"30s"`, `"5m"`, `"250ms"`), checked while the
/// file is deserialized, so a bad one is reported with its key and line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawDuration(Duration);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration as a string, such as \"30s\" or \"5m\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawDuration, E> {
                if s.trim().parse::<f64>().is_ok() {
                    return Err(E::custom(format!(
                        "\"{s}\" has no unit: write a duration with its unit, such as \"{}s\" or \"{}m\"",
                        s.trim(),
                        s.trim()
                    )));
                }
                humantime::parse_duration(s)
                    .map(RawDuration)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(s), &self))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// The duration, or `default` when the key is absent.
fn duration(value: Option<RawDuration>, default: Duration) -> Duration {
    value.map_or(default, |d| d.0)
}

/// A positive size written as a string (`"64MiB"`, `"1GB"`), checked while the file is
/// deserialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawSize(u64);

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a positive size as a string, such as \"64MiB\" or \"1GB\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawSize, E> {
                match s.parse::<bytesize::ByteSize>() {
                    Ok(b) if b.as_u64() > 0 => Ok(RawSize(b.as_u64())),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_str(Visitor)
    }
}

fn audit_action(what: &str, value: Option<String>, problems: &mut Found<'_>) -> AuditFailureAction {
    match value.as_deref() {
        None | Some("deny") => AuditFailureAction::Deny,
        Some("serve") => AuditFailureAction::Serve,
        Some(other) => {
            problems.push(
                &format!("audit.{what}"),
                format!("audit.{what}: \"{other}\" is not one of \"deny\", \"serve\""),
            );
            AuditFailureAction::Deny
        }
    }
}

fn audit_settings(
    raw: RawAudit,
    sink: AuditSink,
    base: &Path,
    problems: &mut Found<'_>,
) -> AuditSettings {
    let defaults = AuditSettings::default();
    let fsync = match raw.fsync.as_deref() {
        None | Some("never") => AuditFsync::Never,
        Some("always") => AuditFsync::Always,
        Some(other) => match humantime::parse_duration(other) {
            Ok(d) if !d.is_zero() => AuditFsync::Every(d),
            _ => {
                problems.push("audit.fsync", format!(
                    "audit.fsync: \"{other}\" is not \"never\", \"always\" or a duration such as \"1s\""
                ));
                AuditFsync::Never
            }
        },
    };
    let format = match raw.format.as_deref() {
        None | Some("json") => AuditFormat::Json,
        Some("ecs") => AuditFormat::Ecs,
        Some(other) => {
            problems.push(
                "audit.format",
                format!("audit.format: \"{other}\" is not one of \"json\", \"ecs\""),
            );
            AuditFormat::Json
        }
    };
    if fsync != AuditFsync::Never && !matches!(sink, AuditSink::File(_)) {
        problems.push(
            "audit.fsync",
            "audit.fsync: only a file audit log (`[log] audit = \"PATH\"`) can be fsynced",
        );
    }
    let rotate_size = raw.rotate_size.map(|s| s.0);
    if rotate_size.is_some() && !matches!(sink, AuditSink::File(_)) {
        problems.push(
            "audit.rotate_size",
            "audit.rotate_size: only a file audit log (`[log] audit = \"PATH\"`) rotates",
        );
    }
    let chain = raw.chain.unwrap_or(defaults.chain);
    if raw.signing_key.is_some() && !chain {
        problems.push(
            "audit.signing_key",
            "audit.signing_key: checkpoints sign the chain, so `chain` must not be false",
        );
    }
    let checkpoint_every = raw.checkpoint_every.unwrap_or(defaults.checkpoint_every);
    if checkpoint_every == 0 {
        problems.push(
            "audit.checkpoint_every",
            "audit.checkpoint_every: must be at least 1",
        );
    }
    let syslog = raw.syslog.map(|s| {
        let server_name = s.server_name.unwrap_or_else(|| {
            s.address
                .rsplit_once(':')
                .map_or(s.address.as_str(), |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        });
        if s.cert.is_some() != s.key.is_some() {
            problems.push("audit.syslog", "audit.syslog: `cert` and `key` go together");
        }
        let facility =
            match s.facility.as_deref() {
                None => 13,
                Some(f) => match f.parse::<u8>() {
                    Ok(n) if n <= 23 => n,
                    _ => {
                        problems.push("audit.syslog.facility", format!(
                        "audit.syslog.facility: \"{f}\" is not a facility number from 0 to 23"
                    ));
                        13
                    }
                },
            };
        SyslogSettings {
            address: s.address,
            server_name,
            ca: problems.file(base, s.ca, "audit.syslog.ca"),
            cert: s.cert.map(|c| problems.file(base, c, "audit.syslog.cert")),
            key: s.key.map(|k| problems.file(base, k, "audit.syslog.key")),
            spool_dir: problems.file(base, s.spool_dir, "audit.syslog.spool_dir"),
            spool_max: s.spool_max.map_or(DEFAULT_SYSLOG_SPOOL_MAX, |s| s.0),
            app_name: s.app_name.unwrap_or_else(|| "portcullis".into()),
            facility,
        }
    });
    AuditSettings {
        sink,
        disk_full_action: audit_action("disk_full_action", raw.disk_full_action, problems),
        disk_error_action: audit_action("disk_error_action", raw.disk_error_action, problems),
        fsync,
        rotate_size,
        rotate_keep: raw.rotate_keep.unwrap_or(defaults.rotate_keep),
        format,
        chain,
        signing_key: raw
            .signing_key
            .map(|k| problems.file(base, k, "audit.signing_key")),
        checkpoint_every,
        checkpoint_interval: duration(raw.checkpoint_interval, defaults.checkpoint_interval),
        syslog,
        record_requests: raw.record_requests.unwrap_or(false),
    }
}

fn validate(raw: RawConfig, base: &Path, problems: &mut Found<'_>) -> Settings {
    let mode = match raw.server.mode.as_deref() {
        None | Some("enforce") => Mode::Enforce,
        Some("dry-run") => Mode::DryRun,
        Some(other) => {
            problems.push(
                "server.mode",
                format!("server.mode: \"{other}\" is not one of \"enforce\", \"dry-run\""),
            );
            Mode::Enforce
        }
    };
    let grpc = raw
        .server
        .grpc
        .unwrap_or_else(|| DEFAULT_GRPC_LISTEN.to_string());
    let grpc_listen = match grpc.strip_prefix("unix:") {
        Some(path) if !path.is_empty() => Listen::Unix(resolve(base, PathBuf::from(path))),
        _ => grpc.parse().map(Listen::Tcp).unwrap_or_else(|_| {
            problems.push("server.grpc", format!(
                "server.grpc: \"{grpc}\" is not an address like \"127.0.0.1:9191\" or \"unix:/run/portcullis.sock\""
            ));
            Listen::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 9191)))
        }),
    };
    let tls = raw.server.tls.map(|t| TlsSettings {
        cert: problems.file(base, t.cert, "server.tls.cert"),
        key: problems.file(base, t.key, "server.tls.key"),
        client_ca: t
            .client_ca
            .map(|c| problems.file(base, c, "server.tls.client_ca")),
    });
    let shutdown_grace = duration(raw.server.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    let sink = match raw.log.audit.as_deref() {
        None | Some("stdout") => AuditSink::Stdout,
        Some("stderr") => AuditSink::Stderr,
        Some("") => {
            problems.push(
                "log.audit",
                "log.audit: must be \"stdout\", \"stderr\" or a file path",
            );
            AuditSink::Stdout
        }
        Some(path) => AuditSink::File(problems.file(base, PathBuf::from(path), "log.audit")),
    };
    let audit = audit_settings(raw.audit, sink, base, problems);

    let peer = raw.peer.map(|p| {
        for td in &p.trust_domains {
            if let Err(e) = crate::spiffe::TrustDomain::try_from(td.as_str()) {
                problems.push("peer.trust_domains", format!("peer.trust_domains: {e}"));
            }
        }
        let max_request_intermediates = p
            .max_request_intermediates
            .unwrap_or(DEFAULT_MAX_REQUEST_INTERMEDIATES);
        if max_request_intermediates > MAX_REQUEST_INTERMEDIATES {
            problems.push("peer.max_request_intermediates", format!(
                "peer.max_request_intermediates: {max_request_intermediates} is more than {MAX_REQUEST_INTERMEDIATES}, the longest path webpki builds"
            ));
        }
        PeerSettings {
            trust_bundle: problems.file(base, p.trust_bundle, "peer.trust_bundle"),
            intermediates: p
                .intermediates
                .map(|i| problems.file(base, i, "peer.intermediates")),
            trust_domains: p.trust_domains,
            require: p.require,
            max_size: p.max_size.unwrap_or(DEFAULT_CERT_MAX_SIZE),
            max_request_intermediates,
            crls: p
                .crls
                .into_iter()
                .enumerate()
                .map(|(n, c)| problems.file(base, c, &format!("peer.crls[{n}]")))
                .collect(),
            header: p.header.map(|h| header_name("peer.header", "peer.header", h, problems)),
            xfcc: match p.xfcc.as_deref() {
                None | Some("off") => XfccMode::Off,
                Some("nearest") => XfccMode::Nearest,
                Some(other) => {
                    problems.push("peer.xfcc", format!(
                        "peer.xfcc: \"{other}\" is not one of \"off\", \"nearest\""
                    ));
                    XfccMode::Off
                }
            },
        }
    });

    let mut seen = BTreeSet::new();
    // Each issuer's id prefix as written (None: left to the default, "").
    let prefixes: Vec<(String, Option<String>)> = raw
        .issuers
        .iter()
        .map(|r| (r.issuer.clone(), r.id_prefix.clone()))
        .collect();
    let issuers: Vec<IssuerSettings> = raw
        .issuers
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!(
                "issuer #{} (\"{}\")",
                problems.index_in_file("issuer", i) + 1,
                r.issuer
            );
            if r.issuer.is_empty() {
                problems.push(&format!("issuer[{i}].issuer"), format!("{at}: issuer must not be empty"));
            }
            if !seen.insert(r.issuer.clone()) {
                problems.push(&format!("issuer[{i}]"), format!("{at}: the same issuer is configured twice"));
            }
            if r.audiences.is_empty() || r.audiences.iter().any(String::is_empty) {
                problems.push(&format!("issuer[{i}].audiences"), format!("{at}: audiences must list at least one non-empty audience (tokens without a matching aud are rejected)"
                ));
            }
            let files = r.jwks_file.is_some() || !r.pem_keys.is_empty();
            let source = match (files, r.jwks_uri.clone(), r.discovery) {
                (true, None, false) => KeySource::Files,
                (false, Some(uri), false) => {
                    if let Err(e) = check_fetch_url(&uri) {
                        problems.push(&format!("issuer[{i}].jwks_uri"), format!("{at}: jwks_uri: {e}"));
                    }
                    KeySource::JwksUri(uri)
                }
                (false, None, true) => {
                    if let Err(e) = check_fetch_url(&r.issuer) {
                        problems.push(&format!("issuer[{i}].discovery"), format!("{at}: discovery needs a fetchable issuer URL: {e}"));
                    }
                    KeySource::Discovery
                }
                (false, None, false) => {
                    problems.push(&format!("issuer[{i}]"), format!("{at}: no keys: set jwks_file or pem_keys, jwks_uri, or discovery = true"
                    ));
                    KeySource::Files
                }
                _ => {
                    problems.push(&format!("issuer[{i}]"), format!("{at}: choose one key source: jwks_file/pem_keys, jwks_uri, or discovery = true"
                    ));
                    KeySource::Files
                }
            };
            let fetch = FetchSettings {
                ca_bundle: r
                    .ca_bundle
                    .map(|p| problems.file(base, p, &format!("issuer[{i}].ca_bundle"))),
                refresh_min: duration(r.refresh_min, DEFAULT_REFRESH_MIN),
                refresh_max: duration(r.refresh_max, DEFAULT_REFRESH_MAX),
                timeout: duration(r.fetch_timeout, DEFAULT_FETCH_TIMEOUT),
                max_size: r.max_key_set_size.unwrap_or(DEFAULT_MAX_KEY_SET_SIZE),
                unknown_kid_interval: duration(r.unknown_kid_interval, DEFAULT_UNKNOWN_KID_INTERVAL),
                unknown_kid_wait: duration(r.unknown_kid_wait, DEFAULT_UNKNOWN_KID_WAIT),
                max_staleness: duration(r.max_staleness, DEFAULT_MAX_STALENESS),
                required_at_start: r.required_at_start.unwrap_or(true),
            };
            if fetch.refresh_min > fetch.refresh_max {
                problems.push(&format!("issuer[{i}].refresh_min"), format!("{at}: refresh_min is larger than refresh_max"));
            }
            if fetch.refresh_min.is_zero() || fetch.timeout.is_zero() {
                problems.push(&format!("issuer[{i}].refresh_min"), format!("{at}: refresh_min and fetch_timeout must be positive"));
            }
            let names = r
                .algorithms
                .unwrap_or_else(|| DEFAULT_ALGORITHMS.iter().map(|s| s.to_string()).collect());
            if names.is_empty() {
                problems.push(&format!("issuer[{i}].algorithms"), format!("{at}: algorithms must not be empty"));
            }
            let algorithms = names
                .iter()
                .filter_map(|n| match crate::jose::parse_allowed_algorithm(n) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        problems.push(&format!("issuer[{i}].algorithms"), format!("{at}: algorithms: {e}"));
                        None
                    }
                })
                .collect();
            let leeway = duration(r.leeway, DEFAULT_LEEWAY);
            if leeway > MAX_LEEWAY {
                problems.push(&format!("issuer[{i}].leeway"), format!("{at}: leeway of {} is larger than the maximum of 5m",
                    humantime::format_duration(leeway)
                ));
            }
            let max_lifetime = duration(r.max_lifetime, DEFAULT_MAX_LIFETIME);
            if max_lifetime.is_zero() {
                problems.push(&format!("issuer[{i}].max_lifetime"), format!("{at}: max_lifetime must be positive"));
            }
            IssuerSettings {
                audiences: r.audiences,
                source,
                fetch,
                jwks_file: r
                    .jwks_file
                    .map(|p| problems.file(base, p, &format!("issuer[{i}].jwks_file"))),
                pem_keys: r
                    .pem_keys
                    .into_iter()
                    .enumerate()
                    .map(|(n, k)| {
                        let at = format!("issuer[{i}].pem_keys[{n}].path");
                        (problems.file(base, k.path, &at), k.kid)
                    })
                    .collect(),
                algorithms,
                leeway,
                max_lifetime,
                required_claims: r.required_claims,
                typ: r.typ,
                require_binding: r.require_binding,
                groups_claim: r.groups_claim.unwrap_or_else(|| "groups".to_string()),
                id_prefix: r.id_prefix.unwrap_or_default(),
                claim_headers: r
                    .claim_headers
                    .into_iter()
                    .map(|(h, c)| (header_name(&format!("{at}: claim_headers"), &format!("issuer[{i}].claim_headers.{h}"), h, problems), c))
                    .collect(),
                claims: r.claims.into_iter().collect(),
                issuer: r.issuer,
            }
        })
        .collect();
    // SECURITY: two issuers with one id prefix name the same `User` and `Group` entities, so
    // either identity provider can vouch for the other's users and grant its groups (a
    // partner's token with `sub: carol` and `groups: [admins]` is the main IdP's carol in
    // its admins). Refused unless both issuers set that prefix on purpose.
    for (i, (issuer, prefix)) in prefixes.iter().enumerate() {
        let Some((other, other_prefix)) = prefixes[..i].iter().find(|(_, p)| {
            p.as_deref().unwrap_or_default() == prefix.as_deref().unwrap_or_default()
        }) else {
            continue;
        };
        if prefix.is_some() && other_prefix.is_some() {
            continue;
        }
        problems.push(
            &format!("issuer[{i}]"),
            format!(
                "issuers \"{other}\" and \"{issuer}\" have the same id prefix (\"{}\"): their tokens name the same User and Group entities, so either identity provider could vouch for the other's users and grant the other's groups. Give each its own `id_prefix` (e.g. id_prefix = \"partner/\"), or, to share users and groups on purpose, set the same id_prefix explicitly on both",
                prefix.as_deref().unwrap_or_default()
            ),
        );
    }
    for conflict in crate::declared::conflicting_claim_types(
        issuers
            .iter()
            .map(|i| (i.issuer.as_str(), i.claims.as_slice())),
    ) {
        problems.push("issuer", conflict);
    }

    let policy = PolicySettings {
        dir: problems.file(
            base,
            raw.policy.dir.unwrap_or_else(|| PathBuf::from("policies")),
            "policy.dir",
        ),
        schema: raw
            .policy
            .schema
            .map(|p| problems.file(base, p, "policy.schema")),
        entities: raw
            .policy
            .entities
            .map(|p| problems.file(base, p, "policy.entities")),
        hidden_headers: Vec::new(),
        time_zone: raw.policy.time_zone.unwrap_or_default(),
        declared_claims: Some(crate::declared::DeclaredClaims::of(
            issuers
                .iter()
                .map(|i| (i.issuer.as_str(), i.claims.as_slice())),
        )),
    };
    let shadow_dir = raw
        .policy
        .shadow_dir
        .map(|p| problems.file(base, p, "policy.shadow_dir"));

    let principal_header = header_name(
        "response.principal_header",
        "response.principal_header",
        raw.response
            .principal_header
            .unwrap_or_else(|| DEFAULT_PRINCIPAL_HEADER.to_string()),
        problems,
    );
    let global_claim_headers: Vec<(String, String)> = raw
        .response
        .claim_headers
        .into_iter()
        .map(|(h, c)| {
            (
                header_name(
                    "response.claim_headers",
                    &format!("response.claim_headers.{h}"),
                    h,
                    problems,
                ),
                c,
            )
        })
        .collect();
    // SECURITY: headers filled from claims are vouched for by the issuer that signed
    // them. Shared by several issuers, a less-trusted one (a partner IdP) could put any
    // value in a header upstreams read as the first one's (`x-user-email`).
    let mut issuers = issuers;
    if !global_claim_headers.is_empty() {
        match issuers.as_mut_slice() {
            [] => {}
            [only] if only.claim_headers.is_empty() => {
                only.claim_headers = global_claim_headers.clone();
            }
            [_] => problems.push(
                "response.claim_headers",
                "response.claim_headers: the issuer sets its own claim_headers; keep one of the two",
            ),
            several => problems.push("response.claim_headers", format!(
                "response.claim_headers: with {} issuers one issuer's tokens would fill headers for all of them; set claim_headers on each [[issuer]] instead",
                several.len()
            )),
        }
    }
    let claim_headers: std::collections::BTreeMap<String, Vec<(String, String)>> = issuers
        .iter()
        .filter(|i| !i.claim_headers.is_empty())
        .map(|i| (i.issuer.clone(), i.claim_headers.clone()))
        .collect();
    let mut claim_header_names: Vec<String> = claim_headers
        .values()
        .flatten()
        .map(|(h, _)| h.clone())
        .collect();
    claim_header_names.sort();
    claim_header_names.dedup();
    let http_listen = raw.server.http;
    if let Some(h) = &http_listen
        && h.parse::<std::net::SocketAddr>().is_err()
    {
        problems.push(
            "server.http",
            format!("server.http: \"{h}\" is not an address like \"127.0.0.1:9192\""),
        );
    }
    let token = TokenSettings {
        max_size: raw.token.max_size.unwrap_or(DEFAULT_TOKEN_MAX_SIZE),
        revoked: raw
            .token
            .revoked
            .map(|p| problems.file(base, p, "token.revoked")),
        header: raw
            .token
            .header
            .map(|h| header_name("token.header", "token.header", h, problems)),
        cookie: raw.token.cookie,
        pass_schemes: raw
            .token
            .pass_schemes
            .into_iter()
            .map(|s| s.to_ascii_lowercase())
            .collect(),
    };
    for scheme in &token.pass_schemes {
        if scheme == "bearer"
            || scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            problems.push("token.pass_schemes", format!(
                "token.pass_schemes: \"{scheme}\" is not an authorization scheme other than Bearer"
            ));
        }
    }

    let headers =
        |what: &str, v: Option<Vec<String>>, default: &[&str], problems: &mut Found<'_>| {
            v.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
                .into_iter()
                .map(|h| header_name(what, what, h, problems))
                .collect::<Vec<_>>()
        };
    let forward_auth = raw.forward_auth.map(|f| {
        let path = f.path.unwrap_or_else(|| "/auth".to_string());
        if !path.starts_with('/') {
            problems.push(
                "forward_auth.path",
                format!("forward_auth.path: \"{path}\" must start with '/'"),
            );
        }
        ForwardAuthSettings {
            path,
            method_headers: headers(
                "forward_auth.method_headers",
                f.method_headers,
                &["x-forwarded-method", "x-original-method"],
                problems,
            ),
            uri_headers: headers(
                "forward_auth.uri_headers",
                f.uri_headers,
                &["x-forwarded-uri", "x-original-uri"],
                problems,
            ),
            host_headers: headers(
                "forward_auth.host_headers",
                f.host_headers,
                &["x-forwarded-host", "host"],
                problems,
            ),
            proto_headers: headers(
                "forward_auth.proto_headers",
                f.proto_headers,
                &["x-forwarded-proto"],
                problems,
            ),
            source_headers: headers(
                "forward_auth.source_headers",
                f.source_headers,
                &["x-real-ip", "x-forwarded-for"],
                problems,
            ),
        }
    });
    if forward_auth.is_some() && http_listen.is_none() {
        problems.push(
            "forward_auth",
            "forward_auth: needs the HTTP listener: set server.http",
        );
    }
    let defaults = Limits::default();
    let l = raw.limits;
    let limits = Limits {
        max_message_bytes: l.max_message_bytes.unwrap_or(defaults.max_message_bytes),
        max_headers: l.max_headers.unwrap_or(defaults.max_headers),
        max_header_bytes: l.max_header_bytes.unwrap_or(defaults.max_header_bytes),
        max_concurrent: l.max_concurrent.unwrap_or(defaults.max_concurrent),
        max_streams_per_connection: l
            .max_streams_per_connection
            .unwrap_or(defaults.max_streams_per_connection),
        request_timeout: duration(l.request_timeout, defaults.request_timeout),
        max_http_connections: l
            .max_http_connections
            .unwrap_or(defaults.max_http_connections),
        http_header_timeout: duration(l.http_header_timeout, defaults.http_header_timeout),
        strict_paths: l.strict_paths.unwrap_or(defaults.strict_paths),
        max_file_bytes: l.max_file_bytes.unwrap_or(defaults.max_file_bytes),
        http_body_timeout: duration(l.http_body_timeout, defaults.http_body_timeout),
        tls_handshake_timeout: duration(l.tls_handshake_timeout, defaults.tls_handshake_timeout),
        max_tls_handshakes: l.max_tls_handshakes.unwrap_or(defaults.max_tls_handshakes),
    };
    let zero = [
        ("max_message_bytes", limits.max_message_bytes == 0),
        ("max_headers", limits.max_headers == 0),
        ("max_header_bytes", limits.max_header_bytes == 0),
        ("max_concurrent", limits.max_concurrent == 0),
        (
            "max_streams_per_connection",
            limits.max_streams_per_connection == 0,
        ),
        ("request_timeout", limits.request_timeout.is_zero()),
        ("max_http_connections", limits.max_http_connections == 0),
        ("http_header_timeout", limits.http_header_timeout.is_zero()),
        ("max_file_bytes", limits.max_file_bytes == 0),
        ("http_body_timeout", limits.http_body_timeout.is_zero()),
        (
            "tls_handshake_timeout",
            limits.tls_handshake_timeout.is_zero(),
        ),
        ("max_tls_handshakes", limits.max_tls_handshakes == 0),
    ];
    for (name, _) in zero.iter().filter(|(_, z)| *z) {
        problems.push(
            &format!("limits.{name}"),
            format!("limits.{name}: must be positive"),
        );
    }
    // Only an issuer whose keys are fetched ever waits for a refresh.
    for i in issuers
        .iter()
        .filter(|i| i.source != KeySource::Files)
        .filter(|i| i.fetch.unknown_kid_wait >= limits.request_timeout)
    {
        problems.push("limits.request_timeout", format!(
            "limits.request_timeout ({}) must be longer than the unknown_kid_wait of issuer \"{}\" ({}), or a request waiting for new keys would always time out",
            humantime::format_duration(limits.request_timeout),
            i.issuer,
            humantime::format_duration(i.fetch.unknown_kid_wait)
        ));
    }
    let cache_defaults = CacheSettings::default();
    let cache = CacheSettings {
        tokens: raw.cache.tokens.unwrap_or(cache_defaults.tokens),
        certificates: raw
            .cache
            .certificates
            .unwrap_or(cache_defaults.certificates),
    };
    Settings {
        origin: Origin::default(),
        limits,
        cache,
        forward_auth,
        grpc_listen,
        tls,
        shutdown_grace,
        audit,
        http_listen,
        mode,
        peer,
        response: ResponseSettings {
            principal_header,
            claim_headers,
            claim_header_names,
            strip_authorization: raw.response.strip_authorization,
            token_header: token.header.clone(),
            token_cookie: token.cookie.clone(),
        },
        policy: PolicySettings {
            hidden_headers: token.header.iter().cloned().collect(),
            ..policy
        },
        token,
        issuers,
        shadow_dir,
    }
}

/// A lower-case HTTP header name, or a problem.
fn header_name(what: &str, path: &str, name: String, problems: &mut Found<'_>) -> String {
    let name = name.to_ascii_lowercase();
    // RFC 9110 §5.1 token characters.
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(tchar) {
        problems.push(
            path,
            format!("{what}: \"{name}\" is not a valid header name"),
        );
    }
    name
}

/// Key-set URLs must be HTTPS; plain HTTP only to a loopback address (tests, sidecars).
pub fn check_fetch_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("\"{url}\" is not an absolute URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("\"{url}\" has no host, or has user information"));
    }
    match scheme {
        "https" => Ok(()),
        "http" => {
            let host = match authority.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or_default(),
                None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
            };
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "\"{url}\": plain http is only allowed to a loopback address; use https"
                ))
            }
        }
        other => Err(format!("\"{url}\": scheme \"{other}\" is not https")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_settings_are_validated() {
        let s = Settings::from_toml(
            "[log]\naudit = \"a.log\"\n[audit]\ndisk_full_action = \"serve\"\nfsync = \"250ms\"\nrotate_size = \"64MiB\"\nformat = \"ecs\"",
            Path::new("/var/log"),
        )
        .unwrap();
        assert_eq!(s.audit.sink, AuditSink::File("/var/log/a.log".into()));
        assert_eq!(s.audit.disk_full_action, AuditFailureAction::Serve);
        assert_eq!(s.audit.disk_error_action, AuditFailureAction::Deny);
        assert_eq!(s.audit.fsync, AuditFsync::Every(Duration::from_millis(250)));
        assert_eq!(s.audit.rotate_size, Some(64 * 1024 * 1024));
        assert_eq!(s.audit.format, AuditFormat::Ecs);
        assert!(s.audit.chain);
        for (body, expected) in [
            (
                "disk_full_action = \"ignore\"",
                "audit.disk_full_action: \"ignore\" is not one of",
            ),
            ("fsync = \"sometimes\"", "audit.fsync: \"sometimes\" is not"),
            (
                "rotate_size = \"lots\"",
                "[audit] rotate_size: expected a positive size as a string, such as \"64MiB\" or \"1GB\", found string \"lots\"",
            ),
            (
                "rotate_size = \"0\"",
                "[audit] rotate_size: expected a positive size as a string, such as \"64MiB\" or \"1GB\", found string \"0\"",
            ),
            ("format = \"cef\"", "audit.format: \"cef\" is not one of"),
            (
                "checkpoint_every = 0",
                "audit.checkpoint_every: must be at least 1",
            ),
            (
                "chain = false\nsigning_key = \"k.pem\"",
                "audit.signing_key: checkpoints sign the chain",
            ),
            ("colour = \"red\"", "unknown key `colour` in [audit]"),
        ] {
            let err = Settings::from_toml(
                &format!("[log]\naudit = \"a.log\"\n[audit]\n{body}"),
                Path::new(""),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(expected), "{body}: {err}");
        }
        // Only a file rotates.
        let err = Settings::from_toml("[audit]\nrotate_size = \"1MiB\"", Path::new(""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only a file audit log"), "{err}");
        // Only a file is fsynced: stdout would promise a durability it cannot give.
        let err = Settings::from_toml("[audit]\nfsync = \"always\"", Path::new(""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("audit.fsync: only a file audit log"), "{err}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let s = Settings::from_toml("", Path::new("/etc/p")).unwrap();
        assert_eq!(s.grpc_listen.to_string(), DEFAULT_GRPC_LISTEN);
        assert_eq!(s.audit.sink, AuditSink::Stdout);
        assert_eq!(s.mode, Mode::Enforce);
        assert_eq!(s.policy.dir, PathBuf::from("/etc/p/policies"));
        assert_eq!(s.token.max_size, 8192);
        assert!(s.peer.is_none());
        let u =
            Settings::from_toml("[server]\ngrpc = \"unix:run/p.sock\"", Path::new("/srv")).unwrap();
        assert_eq!(
            u.grpc_listen,
            Listen::Unix(PathBuf::from("/srv/run/p.sock"))
        );
    }

    #[test]
    fn request_intermediates_and_deadline_limits() {
        let peer = |extra: &str| format!("[peer]\ntrust_bundle = \"ca.pem\"\n{extra}");
        let s = Settings::from_toml(&peer(""), Path::new("")).unwrap();
        assert_eq!(s.peer.unwrap().max_request_intermediates, 4);
        let s = Settings::from_toml(&peer("max_request_intermediates = 0"), Path::new("")).unwrap();
        assert_eq!(s.peer.unwrap().max_request_intermediates, 0);
        let err = Settings::from_toml(&peer("max_request_intermediates = 7"), Path::new(""))
            .unwrap_err()
            .messages()
            .join("\n");
        assert!(err.contains("peer.max_request_intermediates: 7"), "{err}");
        // A file issuer never waits for keys, so a short request_timeout is fine with it;
        // a fetched one must be given longer than its unknown_kid_wait.
        let files = "[[issuer]]\nissuer = \"https://i\"\naudiences = [\"a\"]\njwks_file = \"k.json\"\n[limits]\nrequest_timeout = \"2ms\"\n";
        let s = Settings::from_toml(files, Path::new("")).unwrap();
        assert_eq!(s.limits.request_timeout, Duration::from_millis(2));
        let fetched = files.replace("jwks_file = \"k.json\"", "jwks_uri = \"https://i/k\"");
        let err = Settings::from_toml(&fetched, Path::new(""))
            .unwrap_err()
            .messages()
            .join("\n");
        assert!(
            err.contains("must be longer than the unknown_kid_wait"),
            "{err}"
        );
    }

    #[test]
    fn fetch_urls_are_https_or_loopback_http() {
        for ok in [
            "https://idp.example.org/keys",
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9/k",
        ] {
            assert_eq!(check_fetch_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://idp.example.org/keys",
            "http://10.0.0.1/jwks",
            "ftp://x/y",
            "https://",
            "keys.json",
            "http://user@127.0.0.1/",
        ] {
            assert!(check_fetch_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_key_source_per_issuer() {
        let both = "[[issuer]]\nissuer = \"https://i\"\naudiences = [\"a\"]\njwks_file = \"k.json\"\ndiscovery = true\n";
        let err = Settings::from_toml(both, Path::new(""))
            .unwrap_err()
            .messages()
            .join("\n");
        assert!(err.contains("choose one key source"), "{err}");
        let remote = "[[issuer]]\nissuer = \"https://i\"\naudiences = [\"a\"]\njwks_uri = \"https://i/jwks\"\n";
        let s = Settings::from_toml(remote, Path::new("")).unwrap();
        assert_eq!(
            s.issuers[0].source,
            KeySource::JwksUri("https://i/jwks".into())
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let err = Settings::from_toml(
            "[server]\ngrpc = \"127.0.0.1:1\"\nbogus = 1\n",
            Path::new(""),
        )
        .unwrap_err()
        .messages();
        assert_eq!(err.len(), 1);
        assert!(err[0].starts_with("line 3"), "{}", err[0]);
        assert!(err[0].contains("bogus"), "{}", err[0]);
    }

    #[test]
    fn a_duration_without_its_unit_says_so() {
        let err = Settings::from_toml("[server]\nshutdown_grace = \"90\"\n", Path::new(""))
            .unwrap_err()
            .messages();
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(err[0].starts_with("line 2"), "{}", err[0]);
        assert!(
            err[0].contains("\"90\" has no unit: write a duration with its unit, such as \"90s\""),
            "{}",
            err[0]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[server]
mode = "maybe"
[[issuer]]
issuer = "https://idp"
algorithms = ["HS256", "none"]
leeway = "forever"
"#;
        let err = Settings::from_toml(text, Path::new("")).unwrap_err();
        let all = err.messages().join("\n");
        for needle in [
            "server.mode",
            "audiences",
            "no keys",
            "HS256",
            "\"none\"",
            "leeway",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }
    /// Every unknown key and every value of the wrong type is reported in one pass, each
    /// at its line, with the fix.
    #[test]
    fn every_key_problem_is_reported_with_its_line_and_fix() {
        let text = "[server]\nmdoe = \"enforce\"\n[[issuer]]\nissuer = \"https://i\"\naudiences = [\"a\"]\njwks_file = \"k.json\"\nlevway = \"30s\"\nmax_lifetime = 30\n[limits]\nmax_concurent = 8\nrequest_timeout = \"soon\"\n[audit]\nrotate_size = \"lots\"\nzzzzzz = 1\n";
        let err = Settings::from_toml(text, Path::new("")).unwrap_err();
        let got: Vec<(Option<usize>, &str)> = err
            .problems()
            .iter()
            .map(|p| (p.line(), p.message()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Some(2),
                    "unknown key `mdoe` in [server]; did you mean `mode`?"
                ),
                (
                    Some(7),
                    "unknown key `levway` in [issuer]; did you mean `leeway`?"
                ),
                (
                    Some(8),
                    "[issuer] max_lifetime: expected a duration as a string, such as \"30s\" or \"5m\", found integer `30`"
                ),
                (
                    Some(10),
                    "unknown key `max_concurent` in [limits]; did you mean `max_concurrent`?"
                ),
                (
                    Some(11),
                    "[limits] request_timeout: expected a duration as a string, such as \"30s\" or \"5m\", found string \"soon\""
                ),
                (
                    Some(13),
                    "[audit] rotate_size: expected a positive size as a string, such as \"64MiB\" or \"1GB\", found string \"lots\""
                ),
                (
                    Some(14),
                    "unknown key `zzzzzz` in [audit]; see docs/CONFIGURATION.md for the valid keys"
                ),
            ]
        );
        // Not the list of every valid name.
        assert!(!err.to_string().contains("expected one of"), "{err}");
    }

    /// Problems found validating values carry the line of their key; a key taken out for
    /// its type is not reported again by validation.
    #[test]
    fn value_problems_carry_their_line() {
        let text = "[server]\ngrpc = \"nowhere\"\nmode = \"maybe\"\n[[issuer]]\nissuer = \"https://i\"\naudiences = [\"a\"]\njwks_file = \"k.json\"\nalgorithms = [\"HS256\"]\n[[issuer]]\nissuer = \"https://j\"\naudiences = [\"a\"]\njwks_file = \"k.json\"\nleeway = \"10m\"\nid_prefix = \"j/\"\n";
        let err = Settings::from_toml(text, Path::new("")).unwrap_err();
        let lines: Vec<Option<usize>> = err.problems().iter().map(Problem::line).collect();
        assert_eq!(lines, vec![Some(2), Some(3), Some(8), Some(13)], "{err}");
        assert!(
            err.problems()[3].message().contains("leeway of 10m"),
            "{err}"
        );
        // A missing key is reported where its table starts.
        let err = Settings::from_toml(
            "[server]\nmode = \"enforce\"\n\n[[issuer]]\naudiences = [\"a\"]\n",
            Path::new(""),
        )
        .unwrap_err();
        assert_eq!(err.problems()[0].line(), Some(4), "{err}");
        assert!(
            err.problems()[0]
                .message()
                .contains("[issuer] is missing the required key `issuer`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_get_the_closest_name_only_when_close() {
        let valid = ["dir", "schema", "entities"];
        assert_eq!(
            unknown_key("shema", "[policy]", &valid),
            "unknown key `shema` in [policy]; did you mean `schema`?"
        );
        assert_eq!(
            unknown_key("colour", "[policy]", &valid),
            "unknown key `colour` in [policy]; valid keys: `dir`, `schema`, `entities`"
        );
        let long = "x".repeat(500);
        assert!(unknown_key(&long, "[policy]", &valid).len() < 200);
    }

    /// The passes are bounded: a file of many bad keys reports the first ones and stops.
    #[test]
    fn the_passes_are_bounded() {
        let text: String = (0..200).map(|i| format!("bad{i} = 1\n")).collect();
        let err = Settings::from_toml(&text, Path::new("")).unwrap_err();
        assert_eq!(err.problems().len(), MAX_DESERIALIZE_PROBLEMS + 1);
        assert!(err.to_string().contains("more than 50 problems"), "{err}");
    }

    /// A problem reading a file the configuration names points at the key that names it.
    #[test]
    fn problems_with_named_files_point_at_their_key() {
        let text = "[policy]\ndir = \"p\"\n\n[[issuer]]\nissuer = \"https://i\"\naudiences = [\"a\"]\njwks_file = \"keys.json\"\n[token]\nrevoked = \"revoked.txt\"\n";
        let s = Settings::from_toml(text, Path::new("/etc/p")).unwrap();
        let placed = |m: &str| s.place(Problem::new(m)).line();
        assert_eq!(
            placed("issuer \"https://i\": /etc/p/keys.json: cannot read"),
            Some(7)
        );
        assert_eq!(placed("/etc/p/p: no *.cedar policy files"), Some(2));
        // A line of the named file is a place of its own; unrelated text is not placed.
        assert_eq!(placed("/etc/p/revoked.txt:2: unknown prefix"), None);
        assert_eq!(placed("/etc/p/revoked.txt: empty"), Some(9));
        assert_eq!(placed("cannot read /etc/p/keys.jsonx: gone"), None);
        assert_eq!(placed("the audit log cannot be written"), None);
    }

    /// A table missing a required key is reported and taken out; the rest of the file is
    /// still checked, and the line of every later problem is the file's own, though an
    /// element before it was taken out of its array.
    #[test]
    fn a_missing_key_does_not_end_the_report() {
        let text = "[[issuer]]\naudiences = [\"a\"]\n\n[[issuer]]\nissuer = \"https://b\"\naudiences = [\"a\"]\njwks_file = \"k.json\"\nleeway = 30\n\n[[issuer]]\nissuer = \"https://c\"\naudiences = [\"a\"]\njwks_file = \"k.json\"\nleeway = \"10m\"\nid_prefix = \"c/\"\n[limits]\nmax_concurent = 1\n";
        let err = Settings::from_toml(text, Path::new("")).unwrap_err();
        let got: Vec<(Option<usize>, &str)> = err
            .problems()
            .iter()
            .map(|p| (p.line(), p.message()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(1), "[issuer] is missing the required key `issuer`"),
                (
                    Some(8),
                    "[issuer] leeway: expected a duration as a string, such as \"30s\" or \"5m\", found integer `30`"
                ),
                (
                    Some(14),
                    "issuer #3 (\"https://c\"): leeway of 10m is larger than the maximum of 5m"
                ),
                (
                    Some(17),
                    "unknown key `max_concurent` in [limits]; did you mean `max_concurrent`?"
                ),
            ],
            "{err}"
        );
    }
}
