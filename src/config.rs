//! Configuration: the TOML file as raw serde structs (unknown keys rejected), turned once
//! into validated [`Settings`] with paths resolved against the file's directory. Every
//! problem is collected and reported together, each with its location.

use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every problem found in a configuration file, reported at once.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} problem(s) in configuration {}:",
            self.problems.len(),
            self.file.display()
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    grpc: Option<String>,
    mode: Option<String>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    max_size: Option<usize>,
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
    algorithms: Option<Vec<String>>,
    leeway: Option<String>,
    max_lifetime: Option<String>,
    #[serde(default)]
    required_claims: Vec<String>,
    typ: Option<String>,
    #[serde(default)]
    require_binding: bool,
    groups_claim: Option<String>,
    id_prefix: Option<String>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResponse {
    principal_header: Option<String>,
}

/// Whether denials are enforced or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    DryRun,
}

/// Validated settings: every path absolute or relative to the working directory,
/// every duration parsed, every default applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub grpc_listen: String,
    pub mode: Mode,
    pub peer: Option<PeerSettings>,
    pub token_max_size: usize,
    pub issuers: Vec<IssuerSettings>,
    pub policy: PolicySettings,
    pub principal_header: String,
}

#[derive(Debug, Clone)]
pub struct PeerSettings {
    pub trust_bundle: PathBuf,
    pub intermediates: Option<PathBuf>,
    pub trust_domains: Vec<String>,
    pub require: bool,
    /// Cap on the URL-encoded PEM as received, checked before decoding.
    pub max_size: usize,
}

#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks_file: Option<PathBuf>,
    pub pem_keys: Vec<(PathBuf, Option<String>)>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub leeway: Duration,
    pub max_lifetime: Duration,
    pub required_claims: Vec<String>,
    pub typ: Option<String>,
    pub require_binding: bool,
    pub groups_claim: String,
    pub id_prefix: String,
}

#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub dir: PathBuf,
    pub schema: Option<PathBuf>,
    pub entities: Option<PathBuf>,
}

pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:9191";
pub const DEFAULT_TOKEN_MAX_SIZE: usize = 8 * 1024;
pub const DEFAULT_CERT_MAX_SIZE: usize = 32 * 1024;
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_PRINCIPAL_HEADER: &str = "x-portcullis-principal";
const DEFAULT_ALGORITHMS: &[&str] = &["RS256", "ES256", "EdDSA"];

impl Settings {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Settings, ConfigErrors> {
        let fail = |problems| ConfigErrors {
            file: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(vec![format!("cannot read the file: {e}")]))?;
        let base = path.parent().unwrap_or(Path::new(""));
        Settings::from_toml(&text, base).map_err(fail)
    }

    /// Parses TOML text; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Settings, Vec<String>> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![toml_error(text, &e)])?;
        let mut problems = Vec::new();
        let settings = validate(raw, base, &mut problems);
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(problems)
        }
    }
}

fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end_matches('\n');
    match e.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            format!("line {line}, column {col}: {msg}")
        }
        None => msg.to_string(),
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

fn duration(
    what: &str,
    value: Option<String>,
    default: Duration,
    problems: &mut Vec<String>,
) -> Duration {
    match value {
        None => default,
        Some(s) => humantime::parse_duration(&s).unwrap_or_else(|e| {
            problems.push(format!("{what}: invalid duration \"{s}\": {e}"));
            default
        }),
    }
}

fn validate(raw: RawConfig, base: &Path, problems: &mut Vec<String>) -> Settings {
    let mode = match raw.server.mode.as_deref() {
        None | Some("enforce") => Mode::Enforce,
        Some("dry-run") => Mode::DryRun,
        Some(other) => {
            problems.push(format!(
                "server.mode: \"{other}\" is not one of \"enforce\", \"dry-run\""
            ));
            Mode::Enforce
        }
    };
    let grpc_listen = raw
        .server
        .grpc
        .unwrap_or_else(|| DEFAULT_GRPC_LISTEN.to_string());
    if grpc_listen.parse::<std::net::SocketAddr>().is_err() {
        problems.push(format!(
            "server.grpc: \"{grpc_listen}\" is not an address like \"127.0.0.1:9191\""
        ));
    }

    let peer = raw.peer.map(|p| {
        for td in &p.trust_domains {
            if let Err(e) = crate::identity::spiffe::TrustDomain::try_from(td.as_str()) {
                problems.push(format!("peer.trust_domains: {e}"));
            }
        }
        PeerSettings {
            trust_bundle: resolve(base, p.trust_bundle),
            intermediates: p.intermediates.map(|i| resolve(base, i)),
            trust_domains: p.trust_domains,
            require: p.require,
            max_size: p.max_size.unwrap_or(DEFAULT_CERT_MAX_SIZE),
        }
    });

    let mut seen = BTreeSet::new();
    let issuers = raw
        .issuers
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("issuer #{} (\"{}\")", i + 1, r.issuer);
            if r.issuer.is_empty() {
                problems.push(format!("{at}: issuer must not be empty"));
            }
            if !seen.insert(r.issuer.clone()) {
                problems.push(format!("{at}: the same issuer is configured twice"));
            }
            if r.audiences.is_empty() || r.audiences.iter().any(String::is_empty) {
                problems.push(format!(
                    "{at}: audiences must list at least one non-empty audience (tokens without a matching aud are rejected)"
                ));
            }
            if r.jwks_file.is_none() && r.pem_keys.is_empty() {
                problems.push(format!("{at}: no keys: set jwks_file or pem_keys"));
            }
            let names = r
                .algorithms
                .unwrap_or_else(|| DEFAULT_ALGORITHMS.iter().map(|s| s.to_string()).collect());
            if names.is_empty() {
                problems.push(format!("{at}: algorithms must not be empty"));
            }
            let algorithms = names
                .iter()
                .filter_map(|n| match crate::identity::keys::parse_allowed_algorithm(n) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        problems.push(format!("{at}: algorithms: {e}"));
                        None
                    }
                })
                .collect();
            let leeway = duration(&format!("{at}: leeway"), r.leeway, DEFAULT_LEEWAY, problems);
            if leeway > MAX_LEEWAY {
                problems.push(format!(
                    "{at}: leeway of {} is larger than the maximum of 5m",
                    humantime::format_duration(leeway)
                ));
            }
            let max_lifetime = duration(
                &format!("{at}: max_lifetime"),
                r.max_lifetime,
                DEFAULT_MAX_LIFETIME,
                problems,
            );
            if max_lifetime.is_zero() {
                problems.push(format!("{at}: max_lifetime must be positive"));
            }
            IssuerSettings {
                audiences: r.audiences,
                jwks_file: r.jwks_file.map(|p| resolve(base, p)),
                pem_keys: r
                    .pem_keys
                    .into_iter()
                    .map(|k| (resolve(base, k.path), k.kid))
                    .collect(),
                algorithms,
                leeway,
                max_lifetime,
                required_claims: r.required_claims,
                typ: r.typ,
                require_binding: r.require_binding,
                groups_claim: r.groups_claim.unwrap_or_else(|| "groups".to_string()),
                id_prefix: r.id_prefix.unwrap_or_default(),
                issuer: r.issuer,
            }
        })
        .collect();

    let policy = PolicySettings {
        dir: resolve(
            base,
            raw.policy.dir.unwrap_or_else(|| PathBuf::from("policies")),
        ),
        schema: raw.policy.schema.map(|p| resolve(base, p)),
        entities: raw.policy.entities.map(|p| resolve(base, p)),
    };

    let principal_header = raw
        .response
        .principal_header
        .unwrap_or_else(|| DEFAULT_PRINCIPAL_HEADER.to_string())
        .to_ascii_lowercase();
    if principal_header.is_empty()
        || !principal_header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        problems.push(format!(
            "response.principal_header: \"{principal_header}\" is not a valid header name"
        ));
    }

    Settings {
        grpc_listen,
        mode,
        peer,
        token_max_size: raw.token.max_size.unwrap_or(DEFAULT_TOKEN_MAX_SIZE),
        issuers,
        policy,
        principal_header,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let s = Settings::from_toml("", Path::new("/etc/p")).unwrap();
        assert_eq!(s.grpc_listen, DEFAULT_GRPC_LISTEN);
        assert_eq!(s.mode, Mode::Enforce);
        assert_eq!(s.policy.dir, PathBuf::from("/etc/p/policies"));
        assert_eq!(s.token_max_size, 8192);
        assert!(s.peer.is_none());
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let err = Settings::from_toml(
            "[server]\ngrpc = \"127.0.0.1:1\"\nbogus = 1\n",
            Path::new(""),
        )
        .unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(err[0].starts_with("line 3"), "{}", err[0]);
        assert!(err[0].contains("bogus"), "{}", err[0]);
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
        let all = err.join("\n");
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
}
