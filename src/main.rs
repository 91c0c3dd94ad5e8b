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
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Decide one CheckRequest (proto3 JSON) offline and explain the decision.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// A file holding an Envoy CheckRequest in proto3 JSON; `-` for standard input.
        #[arg(long, short)]
        request: PathBuf,
        /// Also show the Cedar principal, action, resource and context, and the exact reply.
        #[arg(long)]
        explain: bool,
    },
    /// Load the configuration, keys, trust bundles, policies, schema and entities;
    /// report every problem. Exit 0 when valid, 1 when not.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the policy tests in DIR/tests/*.toml against DIR/*.cedar (with DIR/schema.cedarschema
    /// and DIR/entities.json when present). Exit 0 when all pass, 2 when a case fails, 1 on error.
    Test {
        /// The policy directory.
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
    /// Write throwaway certificates, keys, tokens and sample requests for trying Portcullis.
    Demo {
        #[arg(long, short, default_value = "demo")]
        out: PathBuf,
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
    let cli = Cli::parse();
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
            explain,
        } => {
            let (_, engine) = load(&config, false)?;
            let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            for failure in runtime.block_on(engine.fetch_keys_once()) {
                eprintln!("portcullis: warning: {failure}");
            }
            let text = if request.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).map_err(|e| e.to_string())?
            } else {
                std::fs::read_to_string(&request)
                    .map_err(|e| format!("{}: cannot read: {e}", request.display()))?
            };
            let explanation = portcullis::explain::check_json(
                &engine,
                &text,
                std::time::SystemTime::now(),
                explain,
            )
            .map_err(|e| format!("{}: {e}", request.display()))?;
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
        Command::Test { dir } => {
            let report = portcullis::policytest::run_dir(&dir).map_err(|e| e.to_string())?;
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
            print!("{report}");
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
