//! The `portcullis` binary: parses the command line, loads the configuration and runs a
//! subcommand. Exits non-zero with a clear message on any configuration problem.

use clap::{Parser, Subcommand};
use portcullis::Engine;
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
}

fn load(config: &std::path::Path) -> Result<(Settings, Engine), String> {
    let settings = Settings::load(config).map_err(|e| e.to_string())?;
    portcullis::set_max_file_bytes(settings.limits.max_file_bytes);
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

fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Serve { config } => {
            let (settings, engine) = load(&config)?;
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
            let (_, engine) = load(&config)?;
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
            let (settings, engine) = load(&config)?;
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
    }
}
