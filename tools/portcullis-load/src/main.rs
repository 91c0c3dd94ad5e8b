//! `portcullis-load`: measures Portcullis under gRPC Check load. In: the command line (mode,
//! load shape, world size). It builds a throwaway world (CA chain, certificates, tokens,
//! policies, configuration) in a temporary directory, starts `portcullis serve` (the binary
//! next to this one) and, for `compare`, a no-op Check server on the same gRPC stack, drives
//! load at them, and writes out a table on stdout, a JSON summary and, for `sweep`, a CSV and
//! an SVG plot. `scale` repeats this over worlds of growing size (static entities, policies),
//! one server each, and plots what grows. The temporary directory is removed at the end.

mod bulk;
mod drive;
mod noop;
mod process;
mod report;
mod scale;
mod world;

use clap::{Args, Parser, Subcommand, ValueEnum};
use drive::{Feed, Load, Outcome};
use process::{Memory, Server};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use world::{Kind, World, WorldSpec};

// The same allocator as the server binary, so that the no-op ceiling server (`--serve-noop`)
// runs on the same stack as Portcullis.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "portcullis-load",
    version,
    about = "Load generator for Portcullis: throughput, latency percentiles, CPU and memory",
    long_about = "Load generator for Portcullis. Builds a throwaway world (CA chain, client \
certificates, ES256 tokens, Cedar policies, portcullis.toml) in a temporary directory, starts \
`portcullis serve` from the directory of this executable, and sends Envoy-shaped gRPC Check \
requests: a mix of users with certificate-bound tokens, bearer tokens, workloads with \
certificates only, and a share of requests that must be denied (forbidden path, forged token, \
expired token). Every answer is checked against the status code its request must get.\n\n\
Build both binaries first: cargo build --release --bin portcullis --bin portcullis-load",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Internal: serve the no-op Check server on ADDR, print the bound address, stop at EOF.
    #[arg(long, hide = true, value_name = "ADDR")]
    serve_noop: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Ceiling check: alternate closed-loop runs against a no-op Check server (same gRPC stack,
    /// answers OK without looking) and against Portcullis; report the medians and Portcullis's
    /// throughput as a share of the ceiling.
    Compare {
        #[command(flatten)]
        opts: Options,
        /// Pairs of runs (no-op, then Portcullis).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Latency under load: Portcullis's closed-loop maximum, then fixed-rate (open-loop) runs
    /// at fractions of it; writes sweep.csv, sweep.svg and summary.json to --out.
    Sweep {
        #[command(flatten)]
        opts: Options,
        /// Fractions of the closed-loop maximum to offer, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5,0.75,0.9")]
        fractions: Vec<f64>,
        /// Directory for sweep.csv, sweep.svg and summary.json.
        #[arg(long, default_value = "load-results")]
        out: PathBuf,
    },
    /// Growth with size: for each number of static entities, then each number of policies
    /// (about 10 of which can match any request), a fresh world and server: start-up time,
    /// memory, closed-loop throughput, latency at 1 request in flight, and a reload under
    /// load. Writes scale.csv, scale-entities.svg, scale-policies.svg and scale.json to --out.
    Scale {
        #[command(flatten)]
        opts: Options,
        /// Static entity counts, comma-separated (with 10 policies) [default:
        /// 10,1000,100000,1000000; with --quick: 10,1000]. `--entities` alone skips them.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        entities: Option<Vec<usize>>,
        /// Policy counts, at least 10, comma-separated (with 10 static entities) [default:
        /// 10,100,1000,10000; with --quick: 10,100]. `--policies` alone skips them.
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        policies: Option<Vec<usize>>,
        /// The longest a start-up or a reload may take.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        load_timeout: Duration,
        /// Directory for scale.csv, the two SVG plots and scale.json.
        #[arg(long, default_value = "load-results")]
        out: PathBuf,
    },
    /// One run against one server: closed loop, or a fixed rate with --rate.
    Run {
        #[command(flatten)]
        opts: Options,
        #[arg(long, value_enum, default_value_t = Target::Portcullis)]
        target: Target,
        /// Offered requests per second (open loop); without it, closed loop.
        #[arg(long)]
        rate: Option<f64>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Portcullis,
    Noop,
}

#[derive(Args, Clone)]
struct Options {
    /// HTTP/2 connections to each server.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured duration of each run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unrecorded warm-up before each run.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Smoke test: 1 s runs after 0.5 s of warm-up, one compare round.
    #[arg(long)]
    quick: bool,
    /// Distinct client certificates in the pool.
    #[arg(long, default_value_t = 1000)]
    certs: usize,
    /// Distinct valid tokens (users) in the pool; all are sent at least once per pass.
    #[arg(long, default_value_t = 1000)]
    tokens: usize,
    /// Percentage of requests that must be denied.
    #[arg(long, default_value_t = 10.0)]
    deny_percent: f64,
    /// Never repeat a certificate or token (cold caches): every Portcullis run gets freshly
    /// generated requests, used once. Default: cycle through the pool (warm caches).
    #[arg(long)]
    distinct: bool,
    /// With --distinct: requests generated for each Portcullis run (a run ends early when
    /// they run out).
    #[arg(long, default_value_t = 150_000)]
    distinct_requests: usize,
    /// Seed of the request order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the JSON summary here (sweep: default <out>/summary.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the temporary directory (configuration, audit log, server logs).
    #[arg(long)]
    keep: bool,
    /// A line of the server's `[audit]` table, e.g. `--audit 'fsync = "always"'`
    /// (repeatable): to measure what each audit guarantee costs.
    #[arg(long, value_name = "TOML")]
    audit: Vec<String>,
}

/// Validated options.
#[derive(Debug, Clone, Serialize)]
struct Settings {
    connections: usize,
    concurrency: usize,
    #[serde(serialize_with = "seconds")]
    duration: Duration,
    #[serde(serialize_with = "seconds")]
    warmup: Duration,
    quick: bool,
    world: WorldSpec,
    distinct: bool,
    distinct_requests: usize,
    #[serde(skip)]
    json: Option<PathBuf>,
    #[serde(skip)]
    keep: bool,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Settings {
    /// The shape of one run at `rate` (closed loop when `None`).
    fn load(&self, rate: Option<f64>) -> Load {
        Load {
            connections: self.connections,
            concurrency: self.concurrency,
            rate,
            warmup: self.warmup,
            duration: self.duration,
        }
    }
}

impl Options {
    fn settings(self) -> Result<Settings, String> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("--connections", self.connections),
            ("--concurrency", self.concurrency),
            ("--certs", self.certs),
            ("--tokens", self.tokens),
            ("--distinct-requests", self.distinct_requests),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be positive"));
            }
        }
        if !(0.0..=90.0).contains(&self.deny_percent) {
            problems.push("--deny-percent must be between 0 and 90".into());
        }
        let (duration, warmup) = if self.quick {
            (Duration::from_secs(1), Duration::from_millis(500))
        } else {
            (self.duration, self.warmup)
        };
        if duration.is_zero() {
            problems.push("--duration must be positive".into());
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Settings {
            connections: self.connections,
            concurrency: self.concurrency,
            duration,
            warmup,
            quick: self.quick,
            world: WorldSpec {
                certs: self.certs,
                tokens: self.tokens,
                deny_share: self.deny_percent / 100.0,
                seed: self.seed,
                audit: self.audit,
            },
            distinct: self.distinct,
            distinct_requests: if self.quick {
                self.distinct_requests.min(20_000)
            } else {
                self.distinct_requests
            },
            json: self.json,
            keep: self.keep,
        })
    }
}

/// The JSON summary.
#[derive(Serialize)]
struct Summary {
    tool: &'static str,
    version: &'static str,
    command: Vec<String>,
    started_unix: i64,
    machine: Machine,
    settings: Settings,
    world: WorldSummary,
    portcullis: PortcullisSummary,
    runs: Vec<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compare: Option<CompareSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sweep: Option<SweepSummary>,
}

#[derive(Serialize)]
struct Machine {
    cpus: usize,
    /// `/proc/loadavg` before the first run: the machine may be shared.
    loadavg_before: String,
}

#[derive(Clone, Serialize)]
struct WorldSummary {
    /// Requests in one pass over the pool.
    pass_len: usize,
    mix: BTreeMap<Kind, usize>,
    expected_deny_share: f64,
    generation_seconds: f64,
}

#[derive(Serialize)]
struct PortcullisSummary {
    /// Once SERVING, before any load.
    memory_idle: Memory,
    /// After the last run.
    memory_final: Memory,
    /// Requests sent to Portcullis (warm-up included).
    requests_sent: usize,
    /// Pool mode: passes over the pool; at least 1 means every token and certificate was sent.
    pool_passes: Option<f64>,
    every_token_used: Option<bool>,
}

#[derive(Serialize)]
struct CompareSummary {
    noop: report::Medians,
    portcullis: report::Medians,
    /// Portcullis median throughput / no-op median throughput.
    throughput_ratio: f64,
}

#[derive(Serialize)]
struct SweepSummary {
    closed_loop_max_rps: f64,
    fractions: Vec<f64>,
    csv: PathBuf,
    svg: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.serve_noop, cli.command) {
        (Some(addr), _) => noop::serve(&addr),
        (None, Some(command)) => run(command),
        (None, None) => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("portcullis-load: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    let opts = match &command {
        Command::Compare { opts, .. }
        | Command::Sweep { opts, .. }
        | Command::Run { opts, .. }
        | Command::Scale { opts, .. } => opts.clone(),
    };
    let settings = opts.settings()?;
    if let Command::Sweep { fractions, .. } = &command {
        if fractions.is_empty() || fractions.iter().any(|f| !(*f > 0.0 && *f <= 2.0)) {
            return Err("--fractions must be numbers in (0, 2]".into());
        }
    }
    let plan = match &command {
        Command::Scale {
            entities,
            policies,
            load_timeout,
            out,
            ..
        } => {
            if settings.distinct {
                return Err("scale measures warm caches: --distinct is not supported".into());
            }
            let (default_entities, default_policies): (&[usize], &[usize]) = if settings.quick {
                (&[10, 1000], &[10, 100])
            } else {
                (&[10, 1000, 100_000, 1_000_000], &[10, 100, 1000, 10_000])
            };
            Some(scale::Plan {
                entities: entities
                    .clone()
                    .unwrap_or_else(|| default_entities.to_vec()),
                policies: policies
                    .clone()
                    .unwrap_or_else(|| default_policies.to_vec()),
                load_timeout: *load_timeout,
                out: out.clone(),
            })
        }
        _ => None,
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        // On Ctrl-C the session is dropped, and with it the servers and the temporary directory.
        tokio::select! {
            done = async {
                match plan {
                    Some(plan) => scale_session(settings, plan).await,
                    None => session(command, settings).await,
                }
            } => done,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    })
}

/// The `portcullis` binary next to this one.
fn portcullis_exe() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("own executable: {e}"))?
        .with_file_name("portcullis");
    if !exe.exists() {
        return Err(format!(
            "{} not found: build it with `cargo build --release --bin portcullis`",
            exe.display()
        ));
    }
    Ok(exe)
}

/// Writes the world and generates its pool of requests; prints what it holds.
fn create_world(
    settings: &Settings,
    grpc: std::net::SocketAddr,
) -> Result<(World, Vec<world::Entry>, WorldSummary), String> {
    let generating = Instant::now();
    let world = World::create(settings.world.clone(), grpc)?;
    let pool = world.pool();
    let mix = world.mix_counts();
    let denied: usize = mix
        .iter()
        .filter(|(k, _)| k.expected_code() != 0)
        .map(|(_, n)| n)
        .sum();
    let summary = WorldSummary {
        pass_len: world.pass_len(),
        expected_deny_share: denied as f64 / world.pass_len() as f64,
        mix,
        generation_seconds: generating.elapsed().as_secs_f64(),
    };
    println!(
        "world: {} ({} certificates, {} tokens; {} requests per pass, {:.1}% to be denied; \
         generated in {:.1} s)",
        world.dir.display(),
        settings.world.certs,
        settings.world.tokens,
        summary.pass_len,
        100.0 * summary.expected_deny_share,
        summary.generation_seconds
    );
    println!(
        "  mix per pass: {}",
        summary
            .mix
            .iter()
            .map(|(k, n)| format!("{} {n}", k.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((world, pool, summary))
}

/// Everything one invocation starts, kept together so that it is torn down together.
/// Fields drop in order: the servers stop before the world's directory is removed.
struct Bench {
    portcullis: Server,
    noop: Option<Server>,
    portcullis_feed: Feed,
    noop_feed: Feed,
    /// Requests taken from use-once feeds so far.
    distinct_sent: usize,
    generation: u64,
    runs: Vec<Outcome>,
    /// Portcullis's memory once SERVING, before any load.
    memory_idle: Memory,
    world_summary: WorldSummary,
    world: World,
}

impl Bench {
    /// Writes the world, generates the pool, starts Portcullis (and the no-op server when
    /// `with_noop`) and waits until they serve.
    async fn start(settings: &Settings, with_noop: bool) -> Result<Bench, String> {
        let exe = portcullis_exe()?;
        let addr = process::free_port()?;
        let (world, pool, world_summary) = create_world(settings, addr)?;
        let pool = Arc::new(pool);

        let log = world.dir.join("portcullis.log");
        let mut portcullis = Server::portcullis(&exe, &world.config, addr, &log)?;
        if let Err(e) = portcullis.wait_serving(Duration::from_secs(30)).await {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{e}\nserver output:\n{output}"));
        }
        let noop = if with_noop {
            let mut noop = Server::noop(&world.dir.join("noop.log"))?;
            noop.wait_serving(Duration::from_secs(10)).await?;
            Some(noop)
        } else {
            None
        };
        let memory_idle = process::memory(portcullis.pid())?;
        println!(
            "portcullis pid {} on {}{}; idle RSS {:.1} MiB",
            portcullis.pid(),
            portcullis.addr,
            noop.as_ref()
                .map(|n| format!(", no-op pid {} on {}", n.pid(), n.addr))
                .unwrap_or_default(),
            memory_idle.rss_kib as f64 / 1024.0
        );
        println!(
            "load: {} connections, {} in flight, {:?} warm-up + {:?} measured per run, {}",
            settings.connections,
            settings.concurrency,
            settings.warmup,
            settings.duration,
            if settings.distinct {
                "distinct certificates and tokens (cold caches)"
            } else {
                "pool cycled (warm caches)"
            }
        );
        println!();
        println!("{}", report::header());
        Ok(Bench {
            portcullis_feed: Feed::cycle(pool.clone()),
            noop_feed: Feed::cycle(pool),
            portcullis,
            noop,
            distinct_sent: 0,
            generation: 0,
            runs: Vec::new(),
            memory_idle,
            world_summary,
            world,
        })
    }

    /// The feed for the next Portcullis run: the shared pool, or fresh use-once requests.
    fn portcullis_feed(&mut self, settings: &Settings) -> Feed {
        if !settings.distinct {
            return self.portcullis_feed.clone();
        }
        self.generation += 1;
        let started = Instant::now();
        // Signing-bound work on every core, between runs: nothing else is running.
        let entries = tokio::task::block_in_place(|| {
            self.world
                .distinct(settings.distinct_requests, self.generation)
        });
        println!(
            "  (generated {} distinct requests in {:.1} s)",
            entries.len(),
            started.elapsed().as_secs_f64()
        );
        Feed::once(entries)
    }

    /// One run, printed as it completes.
    async fn measure(
        &mut self,
        target: Target,
        settings: &Settings,
        rate: Option<f64>,
    ) -> Result<Outcome, String> {
        if target == Target::Portcullis {
            // The audit file grows by a line per decision; keep only the current run's.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.world.audit)
                .and_then(|f| f.set_len(0));
        }
        let load = settings.load(rate);
        let outcome = match target {
            Target::Portcullis => {
                let feed = self.portcullis_feed(settings);
                let outcome = drive::run(&self.portcullis, &feed, &load).await?;
                if settings.distinct {
                    self.distinct_sent += feed.issued();
                }
                outcome
            }
            Target::Noop => {
                let noop = self.noop.as_ref().ok_or("no no-op server was started")?;
                drive::run(noop, &self.noop_feed, &load).await?
            }
        };
        println!("{}", report::row(&outcome));
        for note in report::notes(&outcome, target == Target::Portcullis) {
            println!("{note}");
        }
        self.runs.push(outcome.clone());
        Ok(outcome)
    }

    /// Alternates no-op and Portcullis closed-loop runs; prints and returns the medians.
    async fn compare(
        &mut self,
        settings: &Settings,
        rounds: usize,
    ) -> Result<CompareSummary, String> {
        for _ in 0..rounds {
            self.measure(Target::Noop, settings, None).await?;
            self.measure(Target::Portcullis, settings, None).await?;
        }
        let of = |name: &str| -> Vec<&Outcome> {
            self.runs.iter().filter(|o| o.target == name).collect()
        };
        let noop = report::medians(&of("noop"));
        let portcullis = report::medians(&of("portcullis"));
        let ratio = portcullis.throughput_rps / noop.throughput_rps;
        println!();
        for (name, m) in [("no-op", &noop), ("portcullis", &portcullis)] {
            println!(
                "median of {rounds} {name:<10} {:>7.0} req/s  p50 {:.3} ms  p99 {:.3} ms  \
                 p99.9 {:.3} ms  server {:.2} cores ({:.0} req per CPU-second)",
                m.throughput_rps,
                m.latency_ms.p50,
                m.latency_ms.p99,
                m.latency_ms.p999,
                m.server_cpu_cores,
                m.requests_per_server_cpu_second,
            );
        }
        println!(
            "portcullis throughput = {:.1}% of the no-op ceiling (ratio {ratio:.3})",
            100.0 * ratio
        );
        Ok(CompareSummary {
            noop,
            portcullis,
            throughput_ratio: ratio,
        })
    }

    /// The closed-loop maximum, then fixed rates at `fractions` of it; writes the CSV and SVG.
    async fn sweep(
        &mut self,
        settings: &Settings,
        fractions: &[f64],
        out: &std::path::Path,
    ) -> Result<SweepSummary, String> {
        let max_rps = self
            .measure(Target::Portcullis, settings, None)
            .await?
            .throughput_rps;
        for fraction in fractions {
            self.measure(Target::Portcullis, settings, Some(max_rps * fraction))
                .await?;
        }
        let csv = out.join("sweep.csv");
        let svg = out.join("sweep.svg");
        report::write_file(&csv, &report::csv(&self.runs))?;
        let title = format!(
            "Portcullis Check latency vs offered load ({} conns, {} in flight, {})",
            settings.connections,
            settings.concurrency,
            if settings.distinct {
                "cold caches"
            } else {
                "warm caches"
            }
        );
        report::write_file(&svg, &report::svg(&self.runs, max_rps, &title))?;
        println!();
        println!("wrote {} and {}", csv.display(), svg.display());
        Ok(SweepSummary {
            closed_loop_max_rps: max_rps,
            fractions: fractions.to_vec(),
            csv,
            svg,
        })
    }

    /// Portcullis's memory now, and whether every token of the pool has been sent.
    fn portcullis_summary(&self, settings: &Settings) -> Result<PortcullisSummary, String> {
        let memory_final = process::memory(self.portcullis.pid())?;
        let passes = (!settings.distinct)
            .then(|| self.portcullis_feed.issued() as f64 / self.world_summary.pass_len as f64);
        let sent = self.portcullis_feed.issued() + self.distinct_sent;
        println!();
        println!(
            "portcullis memory: RSS {:.1} MiB (peak {:.1} MiB) after {sent} requests{}",
            memory_final.rss_kib as f64 / 1024.0,
            memory_final.hwm_kib as f64 / 1024.0,
            match passes {
                _ if sent == 0 => " (idle: no load was sent to it)".to_string(),
                Some(p) if p >= 1.0 => format!(
                    "; all {} tokens and {} certificates sent ({p:.1} passes over the pool)",
                    settings.world.tokens, settings.world.certs
                ),
                Some(p) => format!("; only {:.0}% of the pool sent", 100.0 * p),
                None => " (all distinct)".to_string(),
            }
        );
        Ok(PortcullisSummary {
            memory_idle: self.memory_idle,
            memory_final,
            requests_sent: sent,
            pool_passes: passes,
            every_token_used: passes.map(|p| p >= 1.0),
        })
    }
}

async fn session(command: Command, settings: Settings) -> Result<(), String> {
    let started_unix = portcullis::demo::unix_now();
    let loadavg_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let with_noop = match &command {
        Command::Compare { .. } => true,
        Command::Run { target, .. } => *target == Target::Noop,
        Command::Sweep { .. } => false,
        Command::Scale { .. } => return Err("scale runs in a session of its own".into()),
    };
    let mut bench = Bench::start(&settings, with_noop).await?;
    let (mut compare, mut sweep) = (None, None);
    let mut json_path = settings.json.clone();
    match &command {
        Command::Run { target, rate, .. } => {
            bench.measure(*target, &settings, *rate).await?;
        }
        Command::Compare { rounds, .. } => {
            let rounds = if settings.quick { 1 } else { (*rounds).max(1) };
            compare = Some(bench.compare(&settings, rounds).await?);
        }
        Command::Sweep { fractions, out, .. } => {
            sweep = Some(bench.sweep(&settings, fractions, out).await?);
            json_path.get_or_insert_with(|| out.join("summary.json"));
        }
        Command::Scale { .. } => {}
    }
    let portcullis = bench.portcullis_summary(&settings)?;
    let runs = std::mem::take(&mut bench.runs);
    // Only Portcullis's answers are checked: the no-op server allows everything.
    let wrong: u64 = runs
        .iter()
        .filter(|o| o.target == "portcullis")
        .map(|o| o.unexpected + o.errors)
        .sum();
    let summary = Summary {
        tool: "portcullis-load",
        version: env!("CARGO_PKG_VERSION"),
        command: std::env::args().collect(),
        started_unix,
        machine: Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg_before,
        },
        settings: settings.clone(),
        world: bench.world_summary.clone(),
        portcullis,
        runs,
        compare,
        sweep,
    };
    if let Some(path) = &json_path {
        let text = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        report::write_file(path, &text)?;
        println!("wrote {}", path.display());
    }
    if settings.keep {
        bench.world.keep();
        println!("kept {}", bench.world.dir.display());
    }
    if wrong > 0 {
        return Err(format!(
            "{wrong} Portcullis answer(s) were errors or not the expected status (see above)"
        ));
    }
    Ok(())
}

/// The JSON summary of `scale`.
#[derive(Serialize)]
struct ScaleSummary {
    tool: &'static str,
    version: &'static str,
    command: Vec<String>,
    started_unix: i64,
    machine: Machine,
    settings: Settings,
    plan: scale::Plan,
    world: WorldSummary,
    points: Vec<scale::Point>,
}

/// The scale mode: one world (certificates, tokens, the request pool) whose entities,
/// policies and configuration are rewritten for each size point, each measured on a server
/// of its own.
async fn scale_session(settings: Settings, plan: scale::Plan) -> Result<(), String> {
    let started_unix = portcullis::demo::unix_now();
    let loadavg_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut points = scale::points(&plan)?;
    let exe = portcullis_exe()?;
    let (mut world, pool, world_summary) = create_world(&settings, process::free_port()?)?;
    let pool = Arc::new(pool);
    let single = Load {
        connections: 1,
        concurrency: 1,
        ..settings.load(None)
    };
    let shapes = scale::Shapes {
        closed: settings.load(None),
        single,
    };
    println!(
        "each point: start-up, then closed loop ({} connections, {} in flight), then 1 \
         connection with 1 in flight, {:?} warm-up + {:?} measured each (warm caches), then a \
         reload under load",
        settings.connections, settings.concurrency, settings.warmup, settings.duration
    );
    for point in &mut points {
        println!();
        println!(
            "== {} {} ({} entities, {} policies)",
            point.axis.name(),
            point.size(),
            point.entities,
            point.policies
        );
        println!("{}", report::header());
        scale::measure(point, &world, &pool, &exe, &shapes, &plan).await;
        match &point.error {
            Some(e) => println!("FAILED: {e}"),
            None => println!(
                "started in {:.2} s (entities.json {:.1} MiB); reload {:.2} s",
                point.load_seconds.unwrap_or(f64::NAN),
                point.entities_file_bytes as f64 / (1024.0 * 1024.0),
                point.reload.as_ref().map_or(f64::NAN, |r| r.seconds)
            ),
        }
    }
    println!();
    print!("{}", scale::table(&points));

    let out = plan.out.clone();
    report::write_file(&out.join("scale.csv"), &scale::csv(&points))?;
    for axis in [scale::Axis::Entities, scale::Axis::Policies] {
        if points.iter().any(|p| p.axis == axis) {
            let svg = out.join(format!("scale-{}.svg", axis.name()));
            report::write_file(&svg, &scale::plot(&points, axis))?;
        }
    }
    let json = settings
        .json
        .clone()
        .unwrap_or_else(|| out.join("scale.json"));
    let failed: Vec<String> = points
        .iter()
        .filter(|p| p.error.is_some())
        .map(|p| format!("{} {}", p.axis.name(), p.size()))
        .collect();
    let wrong: u64 = points.iter().map(scale::Point::wrong).sum();
    let summary = ScaleSummary {
        tool: "portcullis-load",
        version: env!("CARGO_PKG_VERSION"),
        command: std::env::args().collect(),
        started_unix,
        machine: Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg_before,
        },
        settings: settings.clone(),
        plan,
        world: world_summary,
        points,
    };
    let text = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
    report::write_file(&json, &text)?;
    println!(
        "wrote {}/scale.csv, the plots and {}",
        out.display(),
        json.display()
    );
    if settings.keep {
        world.keep();
        println!("kept {}", world.dir.display());
    }
    match (failed.is_empty(), wrong) {
        (true, 0) => Ok(()),
        (true, _) => Err(format!(
            "{wrong} Portcullis answer(s) were errors or not the expected status (see above)"
        )),
        (false, _) => Err(format!(
            "{} point(s) failed: {}; {wrong} wrong answer(s)",
            failed.len(),
            failed.join(", ")
        )),
    }
}
