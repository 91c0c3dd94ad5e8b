//! The `portcullis` binary: parses the command line, loads the configuration and runs a
//! subcommand. Exits non-zero with a clear message on any configuration problem.

use clap::{Parser, Subcommand};
use portcullis::Engine;
use portcullis::audit_chain;
use portcullis::config::Settings;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

// The decision path allocates many small, short-lived values (Cedar builds its request and
// context as trees); mimalloc serves them faster than the system allocator (measured in
// docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "External authorization: mTLS + JWT + Cedar"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Envoy ext_authz v3 gRPC (and grpc.health.v1).
    Serve {
        /// The configuration file (TOML: listeners, trust bundle, issuers, policies; see
        /// examples/portcullis.toml). Paths in it are relative to its own directory.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Decide one request offline, verified as the server would, and explain the decision.
    ///
    /// The request is an Envoy CheckRequest file (--request), or described on the command
    /// line (--method and --path, with --host, --header, --token or --token-file, --cert).
    /// Exit 0 for allow, 2 for deny, 1 on error.
    #[command(group(
        clap::ArgGroup::new("form")
            .required(true)
            .args(["request", "method"])
    ))]
    Check {
        /// The configuration file (TOML: listeners, trust bundle, issuers, policies; see
        /// examples/portcullis.toml). Paths in it are relative to its own directory.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// A file holding an Envoy CheckRequest in proto3 JSON; `-` for standard input.
        #[arg(
            long,
            short,
            value_name = "FILE",
            conflicts_with_all = ["method", "path", "host", "header", "token", "token_file", "cert"]
        )]
        request: Option<PathBuf>,
        /// The request's HTTP method (instead of --request).
        #[arg(long, requires = "path")]
        method: Option<String>,
        /// The request's path, optionally with `?query` (instead of --request).
        #[arg(long, requires = "method")]
        path: Option<String>,
        /// The request's host (`:authority`).
        #[arg(long)]
        host: Option<String>,
        /// A request header, `name=value`; repeatable.
        #[arg(long, value_name = "NAME=VALUE")]
        header: Vec<String>,
        /// A bearer token, sent as `authorization: Bearer TOKEN`.
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the bearer token (`portcullis token > t.jwt`).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The client certificate (PEM, leaf first) the connection presented, sent as
        /// Envoy sends the peer certificate.
        #[arg(long, value_name = "PEM_FILE")]
        cert: Option<PathBuf>,
        /// Also show the Cedar principal, action, resource and context, and the exact reply.
        #[arg(long)]
        explain: bool,
        /// Decide as of this time (RFC 3339 with an offset, `2026-12-07T10:00:00+01:00`):
        /// token expiry, certificate validity and `context.time` alike. By default the
        /// request's own `attributes.request.time`, else now.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Option<std::time::SystemTime>,
    },
    /// Load the configuration, keys, trust bundles, policies, schema and entities;
    /// report every problem. Exit 0 when valid, 1 when not.
    Validate {
        /// The configuration file (TOML: listeners, trust bundle, issuers, policies; see
        /// examples/portcullis.toml). Paths in it are relative to its own directory.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the policy tests in DIR/tests/*.toml against DIR/*.cedar (with DIR/schema.cedarschema
    /// and DIR/entities.json when present). Exit 0 when all pass, 2 when a case fails, 1 on error.
    ///
    /// With --config, the policies, schema and entities are the configuration's, and cases
    /// may be whole requests (a real token and certificate), verified with its issuers and
    /// trust bundle exactly as the server verifies them (docs/TRYING-POLICIES.md).
    Test {
        /// The policy directory (default: policies); not with --config.
        #[arg(conflicts_with = "config", value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The configuration file (TOML; see examples/portcullis.toml) whose [policy] and
        /// issuers and trust bundle the cases are run with.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The directory of test cases (*.toml); default: the policy directory's tests/.
        #[arg(long, value_name = "DIR")]
        cases: Option<PathBuf>,
    },
    /// Format Cedar policy files with Cedar's own formatter, in place.
    ///
    /// Comments are kept; a file is replaced atomically with its permissions. Exit 0 when
    /// done (or, with --check, when nothing would change), 1 when --check finds files to
    /// format, 2 when a file cannot be read, parsed or written.
    Fmt {
        /// Policy files, or directories of *.cedar files.
        #[arg(default_value = "policies", value_name = "DIR|FILE")]
        paths: Vec<PathBuf>,
        /// Change nothing: list the files that would change.
        #[arg(long)]
        check: bool,
    },
    /// Mint a token signed by the demo identity provider's throwaway key, for trying
    /// requests (`check --token`, a test case's token, curl against a demo server).
    ///
    /// Signs only with the key `portcullis demo` wrote: the key's public key must be listed
    /// in the demo-manifest.json beside it; any other key is refused. Prints the token.
    Token {
        /// The subject (`sub`).
        #[arg(long, visible_alias = "subject")]
        sub: String,
        /// A group (the `groups` claim); repeatable.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// A scope (the `scope` claim, space-separated); repeatable.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Any claim, `key=value`; the value is JSON when it parses as JSON (`n=3`,
        /// `roles=["a","b"]`, `zip="01234"`), a string otherwise. Applied last, so it can
        /// replace any other claim (`exp=1` for an expired token). Repeatable.
        #[arg(long = "claim", value_name = "KEY=VALUE")]
        claims: Vec<String>,
        /// The audience (`aud`); repeatable.
        #[arg(long = "aud", value_name = "AUDIENCE", default_value = portcullis::demo::DEMO_AUDIENCE)]
        audiences: Vec<String>,
        /// The issuer (`iss`).
        #[arg(long, default_value = portcullis::demo::DEMO_ISSUER)]
        iss: String,
        /// The lifetime: `exp` is now plus this (`30s`, `15m`, `1h`).
        #[arg(long, default_value = "15m")]
        ttl: humantime::Duration,
        /// Bind the token to this client certificate (PEM): `cnf.x5t#S256` (RFC 8705).
        #[arg(long, value_name = "CERT_PEM")]
        bind: Option<PathBuf>,
        /// The demo identity provider's key, as `portcullis demo` wrote it.
        #[arg(long, value_name = "KEY", default_value = "demo/idp.throwaway.key")]
        key: PathBuf,
        /// Issue it as of this time (RFC 3339 with an offset): `iat` is this, `exp` this plus
        /// the lifetime; for `check --at` the same time. Now by default.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Option<std::time::SystemTime>,
    },
    /// Write throwaway certificates, keys, tokens and sample requests for trying Portcullis.
    Demo {
        #[arg(long, short, default_value = "demo")]
        out: PathBuf,
    },
    /// Print the Cedar schema that fits the configuration: the default vocabulary, the
    /// issuers' declared claims, the request headers, context.time and the static entities'
    /// types. Save it as the [policy] schema file.
    Schema {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check an audit log's hash chain and signed checkpoints; make checkpoint keys.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Re-evaluate the decisions recorded in audit files (`[audit] record_requests`)
    /// against a candidate policy directory and list every decision that would change.
    /// Exit 0 when none would, 3 when some would, 1 on error (or, with no change found,
    /// when some lines could not be read).
    Replay {
        /// The configuration whose `[policy]` schema and entities are used when DIR has no
        /// schema.cedarschema or entities.json of its own.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The candidate policy directory.
        #[arg(long, value_name = "DIR")]
        policies: PathBuf,
        /// Most changed decisions listed one by one (all are counted).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The audit files (json or ecs format), oldest first.
        #[arg(required = true, value_name = "AUDIT_FILE")]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check audit files' hash chain and, with --key, their signed checkpoints.
    ///
    /// Shows the first line where a file was cut, edited or reordered. Exit 0 when intact,
    /// 1 when broken, 2 when a file or the key cannot be read.
    Verify {
        /// The audit files, oldest first (as rotation names them: audit.log.2 audit.log.1
        /// audit.log); they are checked as one chain.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The checkpoint signing key's public key (PEM, from `portcullis audit public-key`);
        /// without it the checkpoints' signatures are not checked.
        #[arg(long, value_name = "PUBLIC.pem")]
        key: Option<PathBuf>,
    },
    /// Write a new Ed25519 checkpoint signing key and print its public key.
    ///
    /// The private key (PKCS#8 PEM, mode 0600) is for `[audit] signing_key`; the public key
    /// (PEM, on standard output) for `audit verify --key`.
    Keygen {
        /// Where to write the private key; an existing file is never overwritten.
        #[arg(long, short, value_name = "KEY.pem")]
        out: PathBuf,
    },
    /// Print the public key (PEM) of a checkpoint signing key, for `audit verify --key`.
    PublicKey {
        /// The private key (PKCS#8 PEM).
        #[arg(value_name = "KEY.pem")]
        key: PathBuf,
    },
}

/// Loads the configuration and builds the engine. Only `serve` writes the audit log: the
/// other commands check its file without opening it, since a server may be writing it
/// (opening it repairs a torn last line, which must not race the server's writes).
fn load(config: &std::path::Path, serving: bool) -> Result<(Settings, Engine), String> {
    let mut settings = Settings::load(config).map_err(|e| e.to_string())?;
    portcullis::set_max_file_bytes(settings.limits.max_file_bytes);
    if !serving && let portcullis::config::AuditSink::File(path) = &settings.audit.sink {
        portcullis::check_audit_path(path)?;
        settings.audit.sink = portcullis::config::AuditSink::Stdout;
    }
    let engine = Engine::load(&settings).map_err(|e| e.loading(config).to_string())?;
    Ok((settings, engine))
}

fn main() -> ExitCode {
    // A usage error exits 64 (EX_USAGE): clap's own code, 2, is what `check` and `test`
    // answer for a deny or a failing case (and 1 what `audit verify` answers for a broken
    // log), and a mistyped flag must read as neither.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // One crypto backend everywhere (aws-lc-rs); an already-installed provider is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("portcullis: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `RUST_LOG` (default `info`), with the file-watching libraries held at `info` whatever it
/// says: they log every file event at `trace`, so a log written into a watched directory
/// would log its own writes without end.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for target in [
        "notify=info",
        "inotify=info",
        "mio=info",
        "notify_types=info",
    ] {
        if let Ok(directive) = target.parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// `portcullis audit ...`. Errors (exit 2) are printed here: `main`'s exit 1 means a
/// broken log for `audit verify`.
fn audit(command: AuditCommand) -> ExitCode {
    let usage = |msg: String| {
        eprintln!("portcullis: {msg}");
        ExitCode::from(2)
    };
    match command {
        AuditCommand::Verify { files, key } => {
            let key = match key.as_deref().map(audit_chain::PublicKey::load).transpose() {
                Ok(key) => key,
                Err(e) => return usage(e.to_string()),
            };
            match audit_chain::verify(&files, key.as_ref()) {
                Ok(report) => {
                    println!("{report}");
                    if report.intact() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => usage(e.to_string()),
            }
        }
        AuditCommand::Keygen { out } => {
            let (private, public) = match audit_chain::generate_key() {
                Ok(pair) => pair,
                Err(e) => return usage(e),
            };
            if let Err(e) = write_new_private(&out, private.as_bytes()) {
                return usage(format!("{}: cannot write: {e}", out.display()));
            }
            eprintln!(
                "wrote {} (keep it private; [audit] signing_key); its public key, for `audit verify --key`:",
                out.display()
            );
            print!("{public}");
            ExitCode::SUCCESS
        }
        AuditCommand::PublicKey { key } => match audit_chain::public_key_pem(&key) {
            Ok(public) => {
                print!("{public}");
                ExitCode::SUCCESS
            }
            Err(e) => usage(e),
        },
    }
}

/// Creates `path` with `bytes`, readable by its owner only; fails if it exists.
fn write_new_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Serve { config } => {
            let (settings, engine) = load(&config, true)?;
            let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            runtime
                .block_on(portcullis::server::run(&settings, Arc::new(engine)))
                .map_err(|e| format!("server failed: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            config,
            request,
            method,
            path,
            host,
            header,
            token,
            token_file,
            cert,
            explain,
            at,
        } => {
            // The command-line form is read before anything is loaded: a mistake in it is
            // reported at once.
            let described = match (&request, method, path) {
                (None, Some(method), Some(path)) => Some(described_request(
                    method, path, host, &header, token, token_file, cert,
                )?),
                _ => None,
            };
            let (_, engine) = load(&config, false)?;
            let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            for failure in runtime.block_on(engine.fetch_keys_once()) {
                eprintln!("portcullis: warning: {failure}");
            }
            let now = std::time::SystemTime::now();
            let explanation = match (described, request) {
                (Some(described), _) => {
                    portcullis::explain::check(&engine, &described, now, at, explain)
                }
                (None, Some(request)) => {
                    let text = if request.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin()).map_err(|e| e.to_string())?
                    } else {
                        std::fs::read_to_string(&request)
                            .map_err(|e| format!("{}: cannot read: {e}", request.display()))?
                    };
                    portcullis::explain::check_json(&engine, &text, now, at, explain)
                        .map_err(|e| format!("{}: {e}", request.display()))?
                }
                (None, None) => {
                    return Err("give a request: --request FILE, or --method and --path".into());
                }
            };
            println!("{}", explanation.text);
            Ok(if explanation.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Validate { config } => {
            let (settings, engine) = load(&config, false)?;
            if let Some(problems) = engine.shadow_problems() {
                return Err(format!(
                    "{}: the shadow policies (`[policy] shadow_dir`, never enforced) do not load; `serve` would decide with the live policies alone:\n  - {}",
                    config.display(),
                    problems.join("\n  - ")
                ));
            }
            println!(
                "{}: valid ({} issuer(s), {} polic{}, schema {})",
                config.display(),
                settings.issuers.len(),
                engine.policy_count(),
                if engine.policy_count() == 1 {
                    "y"
                } else {
                    "ies"
                },
                if engine.has_schema() {
                    "validated strictly"
                } else {
                    "none"
                },
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Test { dir, config, cases } => {
            let report = match config {
                Some(config) => {
                    let (settings, engine) = load(&config, false)?;
                    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
                    for failure in runtime.block_on(engine.fetch_keys_once()) {
                        eprintln!("portcullis: warning: {failure}");
                    }
                    let cases = cases.unwrap_or_else(|| settings.policy.dir.join("tests"));
                    portcullis::policytest::run_config(&engine, &settings.policy, &cases, &config)
                }
                None => {
                    let dir = dir.unwrap_or_else(|| PathBuf::from("policies"));
                    match cases {
                        Some(cases) => portcullis::policytest::run_dir_with(&dir, &cases),
                        None => portcullis::policytest::run_dir(&dir),
                    }
                }
            }
            .map_err(|e| e.to_string())?;
            for line in &report.lines {
                println!("{line}");
            }
            println!("{}", report.summary());
            Ok(if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Demo { out } => {
            let written = portcullis::demo::write_demo(&out)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            for w in written {
                println!("wrote {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(command) => Ok(audit(command)),
        Command::Fmt { paths, check } => Ok(fmt(&paths, check)),
        Command::Token {
            sub,
            groups,
            scopes,
            claims,
            audiences,
            iss,
            ttl,
            bind,
            key,
            at,
        } => {
            let claims = claims
                .iter()
                .map(|c| portcullis::demo::parse_claim(c))
                .collect::<Result<Vec<_>, _>>()?;
            let bind_pem = bind
                .map(|path| {
                    std::fs::read_to_string(&path)
                        .map_err(|e| format!("{}: cannot read: {e}", path.display()))
                })
                .transpose()?;
            let spec = portcullis::demo::TokenSpec {
                subject: sub,
                issuer: iss,
                audiences,
                groups,
                scopes,
                claims,
                lifetime: ttl.into(),
                bind_pem,
                now: match at {
                    Some(at) => at
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .and_then(|d| i64::try_from(d.as_secs()).ok())
                        .ok_or("--at: a time after 1970")?,
                    None => portcullis::demo::unix_now(),
                },
            };
            println!("{}", portcullis::demo::mint_token(&key, &spec)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { config } => {
            let settings = Settings::load(&config).map_err(|e| e.to_string())?;
            portcullis::set_max_file_bytes(settings.limits.max_file_bytes);
            let schema =
                portcullis::cedar_schema(&settings).map_err(|e| e.loading(&config).to_string())?;
            print!("{schema}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            policies,
            limit,
            files,
        } => {
            let settings = match &config {
                Some(path) => {
                    let settings = Settings::load(path).map_err(|e| e.to_string())?;
                    portcullis::set_max_file_bytes(settings.limits.max_file_bytes);
                    Some(settings)
                }
                None => None,
            };
            let candidate = portcullis::replay::load_candidate(&policies, settings.as_ref())
                .map_err(|e| e.to_string())?;
            let report = portcullis::replay::replay(&candidate, &policies, &files, limit)
                .map_err(|e| e.to_string())?;
            // A closed pipe (`replay ... | head`) ends the output, not the process with a panic.
            {
                use std::io::Write;
                let _ = write!(std::io::stdout().lock(), "{report}");
            }
            Ok(if report.changed() {
                ExitCode::from(3)
            } else if report.unreadable > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// `--at TIME`: an RFC 3339 time with an offset.
fn parse_time(text: &str) -> Result<std::time::SystemTime, String> {
    let t: jiff::Timestamp = text.parse().map_err(|_| {
        format!(
            "\"{text}\" is not an RFC 3339 time with an offset, such as 2026-12-07T10:00:00+01:00"
        )
    })?;
    let secs = u64::try_from(t.as_second()).map_err(|_| "a time after 1970".to_string())?;
    Ok(
        std::time::UNIX_EPOCH
            + std::time::Duration::new(secs, t.subsec_nanosecond().unsigned_abs()),
    )
}

/// `check --method ... --path ...`: the CheckRequest Envoy would send for that request.
fn described_request(
    method: String,
    path: String,
    host: Option<String>,
    headers: &[String],
    token: Option<String>,
    token_file: Option<PathBuf>,
    cert: Option<PathBuf>,
) -> Result<portcullis::CheckRequest, String> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
    };
    let token = match (token, token_file) {
        (Some(token), _) => Some(token),
        (None, Some(file)) => {
            let token = read(&file)?.trim().to_string();
            if token.is_empty() {
                return Err(format!("{}: the token file is empty", file.display()));
            }
            Some(token)
        }
        (None, None) => None,
    };
    let headers = headers
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--header \"{h}\": expected NAME=VALUE"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    portcullis::policytest::WholeRequest {
        method: method.to_ascii_uppercase(),
        path,
        host: host.unwrap_or_default(),
        scheme: String::new(),
        headers,
        token,
        cert_pem: cert.as_deref().map(read).transpose()?,
    }
    .check_request()
}

/// `portcullis fmt`: exit 0 when done, 1 when `--check` finds files to format, 2 on error.
fn fmt(paths: &[PathBuf], check: bool) -> ExitCode {
    let files = match portcullis::policyfmt::cedar_files(paths) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = portcullis::policyfmt::format_files(&files, check);
    for file in &outcome.changed {
        if check {
            println!("would reformat {}", file.display());
        } else {
            println!("formatted {}", file.display());
        }
    }
    for error in &outcome.errors {
        eprintln!("portcullis: {error}");
    }
    if !outcome.errors.is_empty() {
        ExitCode::from(2)
    } else if check && !outcome.changed.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
