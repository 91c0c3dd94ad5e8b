//! The `scale` mode: how start-up, memory, decision latency and reloads grow with the number
//! of static entities and the number of policies. In: the sizes to try and the load shape.
//! For each size, the world gets that many entities (or policies, see `bulk.rs`) and a
//! fresh server is timed to SERVING and measured: closed-loop throughput, latency at one
//! request in flight, and a reload with requests still being answered. Out: one [`Point`]
//! per size, printed as it completes, then a table, a CSV, two SVG plots and a JSON summary.

use crate::bulk::{BASE_POLICIES, Tree};
use crate::drive::{self, Feed, Load, Outcome, Stop};
use crate::process::{self, Memory, RssSampler, Server};
use crate::report;
use crate::world::{Entry, Extras, World};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The gRPC status of a denial for a request past its deadline (`DenyReason::Deadline`).
const DEADLINE_EXCEEDED: i32 = 4;
/// Entities in the world of the policy sweep.
const BASE_ENTITIES: usize = 10;
/// How often memory is sampled and the reload counter polled.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Pause after SERVING before the idle memory is read (background start-up settles).
const SETTLE: Duration = Duration::from_millis(500);
/// Requests are answered for this long before the reload is triggered, and after it ends.
const AROUND_RELOAD: Duration = Duration::from_millis(500);
/// The server's quiet time after a file change before it reloads (`src/reload.rs` QUIET):
/// included in the reload time.
const RELOAD_QUIET: Duration = Duration::from_millis(200);

/// Which size a point varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    Entities,
    Policies,
}

impl Axis {
    pub fn name(self) -> &'static str {
        match self {
            Axis::Entities => "entities",
            Axis::Policies => "policies",
        }
    }
}

/// What the mode is asked to do, from the command line.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Static entity counts (with the [`BASE_POLICIES`] policies).
    pub entities: Vec<usize>,
    /// Policy counts (with [`BASE_ENTITIES`] entities).
    pub policies: Vec<usize>,
    /// The longest a start-up or a reload may take.
    #[serde(serialize_with = "seconds")]
    pub load_timeout: Duration,
    pub out: PathBuf,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A reload of one size point, with requests answered through it.
#[derive(Debug, Clone, Serialize)]
pub struct Reload {
    /// How the reload was caused.
    pub trigger: &'static str,
    /// From the rename to `portcullis_reloads_total{result="success"}` counting it (polled
    /// every 10 ms); includes the server's quiet time after a change.
    pub seconds: f64,
    pub quiet_seconds: f64,
    pub rss_before_kib: u64,
    /// The largest `VmRSS` sampled every 10 ms from the rename to 0.5 s after the reload.
    pub peak_rss_sampled_kib: u64,
    /// `VmHWM` over the same interval (reset before the rename), when the reset worked.
    pub peak_rss_hwm_kib: Option<u64>,
    pub rss_after_kib: u64,
    /// Requests at one in flight from 0.5 s before the rename to 0.5 s after the reload.
    pub during: Outcome,
}

impl Reload {
    /// The peak: `VmHWM` when it could be reset, else the sampled peak.
    pub fn peak_kib(&self) -> u64 {
        self.peak_rss_hwm_kib
            .unwrap_or(self.peak_rss_sampled_kib)
            .max(self.peak_rss_sampled_kib)
    }
}

/// Everything measured at one size. Later fields are absent when an earlier step failed.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub axis: Axis,
    pub entities: usize,
    pub policies: usize,
    pub entities_file_bytes: u64,
    pub policy_file_bytes: u64,
    /// `/proc/loadavg` before the point: the machine may be shared.
    pub loadavg_before: String,
    /// Writing the world's files.
    pub generation_seconds: f64,
    /// From starting the process to gRPC health SERVING (or to the failure).
    pub load_seconds: Option<f64>,
    /// The largest `VmRSS` sampled every 10 ms during start-up.
    pub start_peak_rss_sampled_kib: u64,
    /// 0.5 s after SERVING, before any request: `rss_kib` idle, `hwm_kib` the start-up peak.
    pub memory_serving: Option<Memory>,
    /// Closed loop, warm caches.
    pub closed: Option<Outcome>,
    /// One connection, one request in flight: the decision's own latency.
    pub single: Option<Outcome>,
    pub memory_after_runs: Option<Memory>,
    pub reload: Option<Reload>,
    pub error: Option<String>,
}

impl Point {
    fn new(axis: Axis, entities: usize, policies: usize) -> Point {
        Point {
            axis,
            entities,
            policies,
            entities_file_bytes: 0,
            policy_file_bytes: 0,
            loadavg_before: String::new(),
            generation_seconds: 0.0,
            load_seconds: None,
            start_peak_rss_sampled_kib: 0,
            memory_serving: None,
            closed: None,
            single: None,
            memory_after_runs: None,
            reload: None,
            error: None,
        }
    }

    /// The size this point varies.
    pub fn size(&self) -> usize {
        match self.axis {
            Axis::Entities => self.entities,
            Axis::Policies => self.policies,
        }
    }

    fn runs(&self) -> impl Iterator<Item = &Outcome> {
        [
            self.closed.as_ref(),
            self.single.as_ref(),
            self.reload.as_ref().map(|r| &r.during),
        ]
        .into_iter()
        .flatten()
    }

    /// Answers that were errors or not the expected status, over every run of the point.
    pub fn wrong(&self) -> u64 {
        self.runs().map(|o| o.unexpected + o.errors).sum()
    }

    /// Denials because the request took longer than `[limits] request_timeout` (gRPC code 4,
    /// which no request of the mix should get): counted in [`Point::wrong`] too.
    pub fn deadline_denials(&self) -> u64 {
        self.runs()
            .filter_map(|o| o.status_codes.get(&DEADLINE_EXCEEDED))
            .sum()
    }
}

/// The sizes to measure, in order: the entity sweep, then the policy sweep.
pub fn points(plan: &Plan) -> Result<Vec<Point>, String> {
    if let Some(p) = plan.policies.iter().find(|p| **p < BASE_POLICIES) {
        return Err(format!(
            "--policies: {p} is fewer than the {BASE_POLICIES} base policies"
        ));
    }
    if plan.entities.is_empty() && plan.policies.is_empty() {
        return Err("nothing to measure: give --entities or --policies sizes".into());
    }
    Ok(plan
        .entities
        .iter()
        .map(|&n| Point::new(Axis::Entities, n, BASE_POLICIES))
        .chain(
            plan.policies
                .iter()
                .map(|&n| Point::new(Axis::Policies, BASE_ENTITIES, n)),
        )
        .collect())
}

/// The load shapes of a point's runs.
pub struct Shapes {
    pub closed: Load,
    pub single: Load,
}

/// Measures `point` on a fresh server over `world`; what was measured stays in `point`
/// when a step fails, and the failure in `point.error`.
pub async fn measure(
    point: &mut Point,
    world: &World,
    pool: &Arc<Vec<Entry>>,
    exe: &Path,
    shapes: &Shapes,
    plan: &Plan,
) {
    if let Err(e) = measure_steps(point, world, pool, exe, shapes, plan).await {
        point.error = Some(e);
    }
}

async fn measure_steps(
    point: &mut Point,
    world: &World,
    pool: &Arc<Vec<Entry>>,
    exe: &Path,
    shapes: &Shapes,
    plan: &Plan,
) -> Result<(), String> {
    point.loadavg_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let (grpc, admin) = (process::free_port()?, process::free_port()?);
    let generating = Instant::now();
    write_world(point, world, grpc, admin)?;
    point.generation_seconds = generating.elapsed().as_secs_f64();

    let log = world.dir.join(format!(
        "portcullis-{}-{}.log",
        point.axis.name(),
        point.size()
    ));
    let started = Instant::now();
    let mut server = Server::portcullis(exe, &world.config, grpc, &log)?;
    let sampler = RssSampler::start(server.pid(), SAMPLE_EVERY);
    let serving = server.wait_serving(plan.load_timeout).await;
    point.load_seconds = Some(started.elapsed().as_secs_f64());
    point.start_peak_rss_sampled_kib = sampler.finish();
    if let Err(e) = serving {
        return Err(format!(
            "{e} (after {:.1} s, RSS peak {:.0} MiB){}",
            started.elapsed().as_secs_f64(),
            mib(point.start_peak_rss_sampled_kib),
            log_tail(&log)
        ));
    }
    tokio::time::sleep(SETTLE).await;
    point.memory_serving = Some(process::memory(server.pid())?);

    let feed = Feed::cycle(pool.clone());
    point.closed = Some(run(world, &server, &feed, &shapes.closed, "closed loop").await?);
    point.single = Some(run(world, &server, &feed, &shapes.single, "1 in flight").await?);
    point.memory_after_runs = Some(process::memory(server.pid())?);
    point.reload = Some(reload(world, &server, &feed, admin, plan.load_timeout).await?);
    Ok(())
}

/// Writes the entities, the policies and the configuration of `point`.
fn write_world(
    point: &mut Point,
    world: &World,
    grpc: SocketAddr,
    admin: SocketAddr,
) -> Result<(), String> {
    let tree = Tree::new(point.entities, world.spec.certs);
    point.entities = tree.len();
    let entities = tree.entities_json();
    point.entities_file_bytes = entities.len() as u64;
    world.replace(&world.dir.join("entities.json"), &entities)?;
    drop(entities);
    let base = tree.base_policies();
    let filler = tree.filler_policies(point.policies - BASE_POLICIES);
    point.policy_file_bytes = (base.len() + filler.len()) as u64;
    world.replace(&world.dir.join("policies/load.cedar"), &base)?;
    world.replace(&world.dir.join("policies/filler.cedar"), &filler)?;
    // The entities file may be over the default cap (64 MiB): allow twice its size.
    let cap = portcullis::config::Limits::default()
        .max_file_bytes
        .max(2 * point.entities_file_bytes);
    world.write_config(
        grpc,
        &Extras {
            admin: Some(admin),
            entities: true,
            max_file_bytes: Some(cap),
        },
    )
}

/// One run, printed as it completes with `label`; the audit file is emptied first.
async fn run(
    world: &World,
    server: &Server,
    feed: &Feed,
    load: &Load,
    label: &str,
) -> Result<Outcome, String> {
    truncate_audit(world);
    let outcome = drive::run(server, feed, load).await?;
    println!("{}  ({label})", report::row(&outcome));
    for note in report::notes(&outcome, true) {
        println!("{note}");
    }
    Ok(outcome)
}

/// The audit file grows by a line per decision; keep only the current run's.
fn truncate_audit(world: &World) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .open(&world.audit)
        .and_then(|f| f.set_len(0));
}

/// Rewrites the base policy file with the same text (an atomic rename), which reloads
/// everything (policies, entities, trust material), while one request at a time is sent.
async fn reload(
    world: &World,
    server: &Server,
    feed: &Feed,
    admin: SocketAddr,
    limit: Duration,
) -> Result<Reload, String> {
    truncate_audit(world);
    let client = reqwest::Client::new();
    let before = reload_counts(&client, admin).await?;
    let policies = world.dir.join("policies/load.cedar");
    let text =
        std::fs::read_to_string(&policies).map_err(|e| format!("{}: {e}", policies.display()))?;
    let stop = Arc::new(Stop::default());
    let load = Load {
        connections: 1,
        concurrency: 1,
        rate: None,
        warmup: Duration::ZERO,
        duration: limit + 2 * AROUND_RELOAD + Duration::from_secs(10),
    };
    let during = drive::run_until(server, feed, &load, Some(stop.clone()));
    let reloading = async {
        let result = async {
            tokio::time::sleep(AROUND_RELOAD).await;
            let pid = server.pid();
            let hwm_reset = process::reset_peak(pid);
            let rss_before = process::memory(pid)?.rss_kib;
            let sampler = RssSampler::start(pid, SAMPLE_EVERY);
            let started = Instant::now();
            world.replace(&policies, &text)?;
            loop {
                tokio::time::sleep(SAMPLE_EVERY).await;
                let now = reload_counts(&client, admin).await?;
                if now.1 > before.1 {
                    return Err(format!(
                        "the reload failed (see the server log in {})",
                        world.dir.display()
                    ));
                }
                if now.0 > before.0 {
                    break;
                }
                if started.elapsed() > limit {
                    return Err(format!("no reload within {limit:?}"));
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            // The old snapshot is dropped after the swap: keep sampling through it.
            tokio::time::sleep(AROUND_RELOAD).await;
            let peak_rss_sampled_kib = sampler.finish();
            let after = process::memory(pid)?;
            Ok((
                seconds,
                rss_before,
                peak_rss_sampled_kib,
                hwm_reset.then_some(after.hwm_kib),
                after.rss_kib,
            ))
        }
        .await;
        stop.stop();
        result
    };
    let (during, reloaded) = tokio::join!(during, reloading);
    let (seconds, rss_before_kib, peak_rss_sampled_kib, peak_rss_hwm_kib, rss_after_kib) =
        reloaded?;
    let during = during?;
    println!("{}  (1 in flight, during the reload)", report::row(&during));
    for note in report::notes(&during, true) {
        println!("{note}");
    }
    Ok(Reload {
        trigger: "policies/load.cedar replaced by the same text (atomic rename)",
        seconds,
        quiet_seconds: RELOAD_QUIET.as_secs_f64(),
        rss_before_kib,
        peak_rss_sampled_kib,
        peak_rss_hwm_kib,
        rss_after_kib,
        during,
    })
}

/// `portcullis_reloads_total` for `success` and `failure`, from the admin listener.
async fn reload_counts(client: &reqwest::Client, admin: SocketAddr) -> Result<(u64, u64), String> {
    let metrics = client
        .get(format!("http://{admin}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("metrics on {admin}: {e}"))?
        .text()
        .await
        .map_err(|e| format!("metrics on {admin}: {e}"))?;
    let counter = |result: &str| {
        let prefix = format!("portcullis_reloads_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    Ok((counter("success"), counter("failure")))
}

/// The last lines of a server log, to show with a start-up failure.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if tail.is_empty() {
        String::new()
    } else {
        format!("\nserver output (last lines):\n{tail}")
    }
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The points as a table, one row each, with a failed point's error under its row.
pub fn table(points: &[Point]) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8} {:>9} {:>9} {:>6} {:>8}\n",
        "axis",
        "entities",
        "policies",
        "load s",
        "idle MiB",
        "start pk",
        "1×1 p50",
        "1×1 p99",
        "closed/s",
        "cl p50",
        "cl p99",
        "after MiB",
        "reload s",
        "reload pk",
        "rl max ms",
        "wrong",
        "deadline",
    );
    let opt = |v: Option<f64>, precision: usize| {
        v.map_or_else(|| "-".to_string(), |v| format!("{v:.precision$}"))
    };
    for p in points {
        let single = p.single.as_ref().map(|o| o.latency_ms);
        let closed = p.closed.as_ref();
        let reload = p.reload.as_ref();
        let _ = writeln!(
            s,
            "{:<8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8} {:>9} {:>9} {:>6} {:>8}",
            p.axis.name(),
            p.entities,
            p.policies,
            opt(p.load_seconds, 2),
            opt(p.memory_serving.map(|m| mib(m.rss_kib)), 1),
            opt(
                p.memory_serving
                    .map(|m| mib(m.hwm_kib))
                    .or((p.start_peak_rss_sampled_kib > 0)
                        .then(|| mib(p.start_peak_rss_sampled_kib))),
                1
            ),
            opt(single.map(|l| l.p50), 3),
            opt(single.map(|l| l.p99), 3),
            opt(closed.map(|o| o.throughput_rps), 0),
            opt(closed.map(|o| o.latency_ms.p50), 3),
            opt(closed.map(|o| o.latency_ms.p99), 3),
            opt(p.memory_after_runs.map(|m| mib(m.rss_kib)), 1),
            opt(reload.map(|r| r.seconds), 2),
            opt(reload.map(|r| mib(r.peak_kib())), 1),
            opt(reload.map(|r| r.during.latency_ms.max), 2),
            p.wrong(),
            p.deadline_denials(),
        );
        if let Some(e) = &p.error {
            let _ = writeln!(s, "  failed: {}", e.lines().next().unwrap_or_default());
        }
    }
    s.push_str(
        "load s: start to SERVING; idle MiB: RSS 0.5 s later; start pk: VmHWM then; 1×1: one \
         request in flight (ms); closed/s, cl p50/p99: closed loop (ms); after MiB: RSS after \
         both runs;\nreload s: rename to reload counted (0.2 s quiet included); reload pk: \
         peak RSS in it; rl max ms: slowest answer around it; wrong: errors and unexpected \
         answers, of which deadline: denied past request_timeout\n",
    );
    s
}

/// The points as CSV, one row each; empty cells where a step failed.
pub fn csv(points: &[Point]) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(
        "axis,entities,policies,entities_file_bytes,policy_file_bytes,load_s,\
         start_peak_rss_sampled_kib,idle_rss_kib,start_hwm_kib,\
         single_rps,single_p50_ms,single_p90_ms,single_p99_ms,single_p999_ms,single_max_ms,\
         single_server_cpu_cores,\
         closed_rps,closed_p50_ms,closed_p99_ms,closed_p999_ms,closed_server_cpu_cores,\
         rss_after_runs_kib,reload_s,reload_rss_before_kib,reload_peak_rss_sampled_kib,\
         reload_peak_hwm_kib,reload_rss_after_kib,reload_requests,reload_p99_ms,reload_max_ms,\
         wrong,deadline_denials,error\n",
    );
    let f = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.3}"));
    let u = |v: Option<u64>| v.map_or_else(String::new, |v| v.to_string());
    for p in points {
        let single = p.single.as_ref();
        let closed = p.closed.as_ref();
        let reload = p.reload.as_ref();
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\"",
            p.axis.name(),
            p.entities,
            p.policies,
            p.entities_file_bytes,
            p.policy_file_bytes,
            f(p.load_seconds),
            p.start_peak_rss_sampled_kib,
            u(p.memory_serving.map(|m| m.rss_kib)),
            u(p.memory_serving.map(|m| m.hwm_kib)),
            f(single.map(|o| o.throughput_rps)),
            f(single.map(|o| o.latency_ms.p50)),
            f(single.map(|o| o.latency_ms.p90)),
            f(single.map(|o| o.latency_ms.p99)),
            f(single.map(|o| o.latency_ms.p999)),
            f(single.map(|o| o.latency_ms.max)),
            f(single.map(|o| o.server_cpu_cores)),
            f(closed.map(|o| o.throughput_rps)),
            f(closed.map(|o| o.latency_ms.p50)),
            f(closed.map(|o| o.latency_ms.p99)),
            f(closed.map(|o| o.latency_ms.p999)),
            f(closed.map(|o| o.server_cpu_cores)),
            u(p.memory_after_runs.map(|m| m.rss_kib)),
            f(reload.map(|r| r.seconds)),
            u(reload.map(|r| r.rss_before_kib)),
            u(reload.map(|r| r.peak_rss_sampled_kib)),
            u(reload.and_then(|r| r.peak_rss_hwm_kib)),
            u(reload.map(|r| r.rss_after_kib)),
            u(reload.map(|r| r.during.requests)),
            f(reload.map(|r| r.during.latency_ms.p99)),
            f(reload.map(|r| r.during.latency_ms.max)),
            p.wrong(),
            p.deadline_denials(),
            p.error
                .as_deref()
                .and_then(|e| e.lines().next())
                .unwrap_or_default()
                .replace('"', "'"),
        );
    }
    s
}

/// The plot of one axis: latency, memory and load times against the size.
pub fn plot(points: &[Point], axis: Axis) -> String {
    use report::{Line, Panel};
    let on: Vec<&Point> = points.iter().filter(|p| p.axis == axis).collect();
    let line = |name, colour, dashed, value: &dyn Fn(&Point) -> Option<f64>| Line {
        name,
        colour,
        dashed,
        points: on
            .iter()
            .filter_map(|p| value(p).map(|v| (p.size() as f64, v)))
            .collect(),
    };
    let single = |p: &Point| p.single.as_ref().map(|o| o.latency_ms);
    let closed = |p: &Point| p.closed.as_ref().map(|o| o.latency_ms);
    let latency = Panel {
        y_label: "latency (ms, log scale)",
        lines: vec![
            line("p50, 1 in flight", "#1f77b4", false, &|p| {
                single(p).map(|l| l.p50)
            }),
            line("p99, 1 in flight", "#ff7f0e", false, &|p| {
                single(p).map(|l| l.p99)
            }),
            line("p50, closed loop", "#1f77b4", true, &|p| {
                closed(p).map(|l| l.p50)
            }),
            line("p99, closed loop", "#ff7f0e", true, &|p| {
                closed(p).map(|l| l.p99)
            }),
            line("max during reload", "#d62728", true, &|p| {
                p.reload.as_ref().map(|r| r.during.latency_ms.max)
            }),
        ],
    };
    let memory = Panel {
        y_label: "server RSS (MiB, log scale)",
        lines: vec![
            // Often equal to the idle RSS: drawn first, under the dashed idle line.
            line("peak during start", "#9467bd", false, &|p| {
                p.memory_serving.map(|m| mib(m.hwm_kib))
            }),
            line("idle after start", "#2ca02c", true, &|p| {
                p.memory_serving.map(|m| mib(m.rss_kib))
            }),
            line("after the runs", "#7f7f7f", true, &|p| {
                p.memory_after_runs.map(|m| mib(m.rss_kib))
            }),
            line("peak during reload", "#d62728", false, &|p| {
                p.reload.as_ref().map(|r| mib(r.peak_kib()))
            }),
        ],
    };
    let times = Panel {
        y_label: "seconds (log scale)",
        lines: vec![
            line("start-up to SERVING", "#8c564b", false, &|p| p.load_seconds),
            line("reload (0.2 s quiet incl.)", "#e377c2", false, &|p| {
                p.reload.as_ref().map(|r| r.seconds)
            }),
        ],
    };
    let (title, x_label) = match axis {
        Axis::Entities => (
            format!("Portcullis vs static entities ({BASE_POLICIES} policies)"),
            "static entities in entities.json",
        ),
        Axis::Policies => (
            format!(
                "Portcullis vs policies (about 10 candidates per request, {BASE_ENTITIES} entities)"
            ),
            "policies",
        ),
    };
    report::log_plot(&title, x_label, &[latency, memory, times])
}
