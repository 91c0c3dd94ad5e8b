//! The load driver. In: a server's address and pid, a feed of pre-encoded CheckRequests and
//! the shape of the load (connections, requests in flight, closed loop or a fixed rate,
//! warm-up and measured durations). Out: one [`Outcome`]: throughput, an HDR latency
//! histogram's percentiles, answers counted by status code and checked against what each
//! request must get, RPC errors, and the server's CPU and memory over the measured interval.

use crate::process::{self, Memory, Server};
use crate::world::{Entry, Kind};
use hdrhistogram::Histogram;
use portcullis::proto::envoy::service::auth::v3::CheckResponse;
use prost::bytes::BufMut;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::codegen::Bytes;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstDecoder;

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
/// A request unanswered for this long counts as an error (Envoy would give up far sooner).
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies above this (µs) are recorded as this.
const HISTOGRAM_MAX_US: u64 = 60_000_000;
const ERROR_SAMPLES: usize = 5;
/// Kinds by index, for per-worker counters without a map: in the declaration order of
/// `Kind`, so that `kind as usize` is its index here.
const KINDS: [Kind; 7] = [
    Kind::BoundUser,
    Kind::BearerUser,
    Kind::UserViaWorkload,
    Kind::Workload,
    Kind::ForbiddenPath,
    Kind::ForgedToken,
    Kind::ExpiredToken,
];

/// Requests to send, in order: a pool cycled for as long as needed, or a set used once.
#[derive(Clone)]
pub struct Feed {
    entries: Arc<Vec<Entry>>,
    cursor: Arc<AtomicUsize>,
    wrap: bool,
}

impl Feed {
    /// Cycles through `entries`; the position carries over from run to run.
    pub fn cycle(entries: Arc<Vec<Entry>>) -> Feed {
        Feed {
            entries,
            cursor: Arc::new(AtomicUsize::new(0)),
            wrap: true,
        }
    }

    /// Each entry once, then nothing.
    pub fn once(entries: Vec<Entry>) -> Feed {
        Feed {
            entries: Arc::new(entries),
            cursor: Arc::new(AtomicUsize::new(0)),
            wrap: false,
        }
    }

    fn next(&self) -> Option<&Entry> {
        let i = self.cursor.fetch_add(1, Ordering::Relaxed);
        if self.wrap && !self.entries.is_empty() {
            self.entries.get(i % self.entries.len())
        } else {
            self.entries.get(i)
        }
    }

    /// Requests taken from the feed so far.
    pub fn issued(&self) -> usize {
        self.cursor.load(Ordering::Relaxed)
    }
}

/// The shape of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Load {
    /// HTTP/2 connections (tonic channels).
    pub connections: usize,
    /// Requests in flight at most (one worker each).
    pub concurrency: usize,
    /// Offered requests per second; `None` for closed loop.
    pub rate: Option<f64>,
    #[serde(serialize_with = "seconds")]
    pub warmup: Duration,
    #[serde(serialize_with = "seconds")]
    pub duration: Duration,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Answers to the requests of one kind.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct KindCount {
    pub answered: u64,
    /// Answered with another status code than the kind must get.
    pub unexpected: u64,
}

/// Everything measured in one run.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub target: &'static str,
    /// "closed" or "open" (fixed rate).
    pub mode: &'static str,
    pub load: Load,
    /// The measured interval, seconds.
    pub seconds: f64,
    /// Requests answered (or failed) in the measured interval.
    pub requests: u64,
    pub throughput_rps: f64,
    pub latency_ms: Latency,
    /// Answers by gRPC status code of the CheckResponse (0 allows).
    pub status_codes: BTreeMap<i32, u64>,
    /// Answers by request kind, with those that got another code than expected.
    pub by_kind: BTreeMap<Kind, KindCount>,
    /// Answers whose code is not the one the request must get (meaningful for Portcullis
    /// only: the no-op server allows everything).
    pub unexpected: u64,
    /// Failed RPCs (transport errors, gRPC errors, timeouts).
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Fixed rate only: requests sent late because the worker was still waiting on its
    /// previous answer (their latency is counted from the scheduled time).
    pub behind_schedule: u64,
    /// Server CPU time over the measured interval, in cores (1.0 = one core busy).
    pub server_cpu_cores: f64,
    /// This tool's CPU over the measured interval, in cores (it shares the machine).
    pub client_cpu_cores: f64,
    /// Server memory at the end of the run.
    pub server_memory: Memory,
    /// A use-once feed ran out before the measured interval ended.
    pub feed_exhausted: bool,
}

/// Encodes an already-encoded CheckRequest: the bytes as they are, so that the client spends
/// no time building messages.
#[derive(Clone, Copy)]
struct RawCodec;

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = CheckResponse;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<CheckResponse>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}

/// When a run starts, when recording starts, when it ends.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    measure: Instant,
    end: Instant,
}

/// What one worker saw.
struct Tally {
    histogram: Histogram<u64>,
    codes: BTreeMap<i32, u64>,
    kinds: [KindCount; KINDS.len()],
    errors: u64,
    error_samples: Vec<String>,
    behind: u64,
}

impl Tally {
    fn new() -> Result<Tally, String> {
        Ok(Tally {
            histogram: Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3)
                .map_err(|e| format!("histogram: {e}"))?,
            codes: BTreeMap::new(),
            kinds: [KindCount::default(); KINDS.len()],
            errors: 0,
            error_samples: Vec::new(),
            behind: 0,
        })
    }

    fn merge(&mut self, other: Tally) -> Result<(), String> {
        self.histogram
            .add(&other.histogram)
            .map_err(|e| format!("histogram: {e}"))?;
        for (code, n) in other.codes {
            *self.codes.entry(code).or_insert(0) += n;
        }
        for (mine, theirs) in self.kinds.iter_mut().zip(other.kinds) {
            mine.answered += theirs.answered;
            mine.unexpected += theirs.unexpected;
        }
        self.errors += other.errors;
        self.behind += other.behind;
        for sample in other.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES {
                self.error_samples.push(sample);
            }
        }
        Ok(())
    }

    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push(message);
        }
    }
}

/// Ends a run before its clock does, from outside (a run open while something else happens).
#[derive(Default)]
pub struct Stop {
    stopped: AtomicBool,
    signal: tokio::sync::Notify,
}

impl Stop {
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        // A stored permit: the run may not be waiting yet.
        self.signal.notify_one();
    }

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}

/// Runs `load` against `server` with requests from `feed`.
pub async fn run(server: &Server, feed: &Feed, load: &Load) -> Result<Outcome, String> {
    run_until(server, feed, load, None).await
}

/// [`run`], ended early when `stop` is given and stopped: each worker finishes the request
/// it is waiting on and sends no more.
pub async fn run_until(
    server: &Server,
    feed: &Feed,
    load: &Load,
    stop: Option<Arc<Stop>>,
) -> Result<Outcome, String> {
    let mut channels = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        // Each `connect` opens its own HTTP/2 connection; clones of a channel share it.
        let channel = Endpoint::from_shared(format!("http://{}", server.addr))
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("{}: cannot connect to {}: {e}", server.name, server.addr))?;
        channels.push(channel);
    }
    // A short lead so every worker is spawned before the first scheduled send.
    let start = Instant::now() + Duration::from_millis(20);
    let clock = Clock {
        start,
        measure: start + load.warmup,
        end: start + load.warmup + load.duration,
    };
    let exhausted = Arc::new(AtomicBool::new(false));
    let exhausted_signal = Arc::new(tokio::sync::Notify::new());
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..load.concurrency {
        let client = tonic::client::Grpc::new(channels[w % channels.len()].clone());
        let feed = feed.clone();
        let exhausted = exhausted.clone();
        let signal = exhausted_signal.clone();
        let schedule = load.rate.map(|rate| (rate, w, load.concurrency));
        let stop = stop.clone();
        workers.spawn(async move {
            let tally = worker(client, feed, clock, schedule, stop).await;
            if let Ok((_, true)) = &tally {
                exhausted.store(true, Ordering::Relaxed);
                signal.notify_one();
            }
            tally
        });
    }

    tokio::time::sleep_until(clock.measure).await;
    if exhausted.load(Ordering::Relaxed) {
        return Err(
            "the distinct request set ran out during warm-up: raise --distinct-requests".into(),
        );
    }
    let own_pid = std::process::id();
    let (server_cpu0, client_cpu0) = (
        process::cpu_seconds(server.pid())?,
        process::cpu_seconds(own_pid)?,
    );
    let measured_from = Instant::now();
    let stopped = async {
        match &stop {
            Some(stop) => stop.signal.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = tokio::time::sleep_until(clock.end) => {}
        () = exhausted_signal.notified() => {}
        () = stopped => {}
    }
    let (server_cpu1, client_cpu1) = (
        process::cpu_seconds(server.pid())?,
        process::cpu_seconds(own_pid)?,
    );
    let seconds = measured_from.elapsed().as_secs_f64();
    let server_memory = process::memory(server.pid())?;

    let mut total = Tally::new()?;
    while let Some(joined) = workers.join_next().await {
        let (tally, _) = joined.map_err(|e| format!("worker failed: {e}"))??;
        total.merge(tally)?;
    }
    let h = &total.histogram;
    let ms = |us: u64| us as f64 / 1000.0;
    let requests = h.len() + total.errors;
    Ok(Outcome {
        target: server.name,
        mode: if load.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        load: load.clone(),
        seconds,
        requests,
        throughput_rps: requests as f64 / seconds,
        latency_ms: Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        },
        status_codes: total.codes,
        by_kind: KINDS
            .iter()
            .copied()
            .zip(total.kinds)
            .filter(|(_, c)| c.answered > 0)
            .collect(),
        unexpected: total.kinds.iter().map(|k| k.unexpected).sum(),
        errors: total.errors,
        error_samples: total.error_samples,
        behind_schedule: total.behind,
        server_cpu_cores: (server_cpu1 - server_cpu0) / seconds,
        client_cpu_cores: (client_cpu1 - client_cpu0) / seconds,
        server_memory,
        feed_exhausted: exhausted.load(Ordering::Relaxed),
    })
}

/// One in-flight slot: sends, waits for the answer, records, repeats until the clock's end.
/// With `schedule = (rate, w, workers)`, worker `w` sends its `i`-th request at
/// `start + (i * workers + w) / rate`, so the workers together offer `rate` evenly; latency is
/// counted from that scheduled time whenever the worker was still busy with the previous
/// request (wrk2's correction for coordinated omission), and from the actual send when it was
/// idle and only woke late (tokio timers tick in milliseconds: that delay is the client's).
/// Returns the tally and whether the feed ran out.
async fn worker(
    mut client: tonic::client::Grpc<Channel>,
    feed: Feed,
    clock: Clock,
    schedule: Option<(f64, usize, usize)>,
    stop: Option<Arc<Stop>>,
) -> Result<(Tally, bool), String> {
    let mut tally = Tally::new()?;
    let path = PathAndQuery::from_static(CHECK_PATH);
    for i in 0u64.. {
        if stop.as_ref().is_some_and(|s| s.stopped()) {
            break;
        }
        let (origin, recorded) = match schedule {
            None => {
                let now = Instant::now();
                if now >= clock.end {
                    break;
                }
                (now, now >= clock.measure)
            }
            Some((rate, w, workers)) => {
                let offset = (i as f64 * workers as f64 + w as f64) / rate;
                let scheduled = clock.start + Duration::from_secs_f64(offset);
                if scheduled >= clock.end {
                    break;
                }
                let behind = Instant::now() > scheduled;
                let origin = if behind {
                    scheduled
                } else {
                    tokio::time::sleep_until(scheduled).await;
                    Instant::now()
                };
                let recorded = scheduled >= clock.measure;
                if behind && recorded {
                    tally.behind += 1;
                }
                (origin, recorded)
            }
        };
        let Some(entry) = feed.next() else {
            return Ok((tally, true));
        };
        let answer = call(&mut client, &path, entry.bytes.clone()).await;
        let latency_us = origin.elapsed().as_micros();
        if !recorded {
            continue;
        }
        match answer {
            Ok(response) => {
                let code = response.status.as_ref().map_or(-1, |s| s.code);
                *tally.codes.entry(code).or_insert(0) += 1;
                let kind = &mut tally.kinds[entry.kind as usize];
                kind.answered += 1;
                if code != entry.kind.expected_code() {
                    kind.unexpected += 1;
                }
                let us = u64::try_from(latency_us).unwrap_or(u64::MAX);
                tally
                    .histogram
                    .saturating_record(us.clamp(1, HISTOGRAM_MAX_US));
            }
            Err(message) => tally.error(message),
        }
    }
    Ok((tally, false))
}

async fn call(
    client: &mut tonic::client::Grpc<Channel>,
    path: &PathAndQuery,
    request: Bytes,
) -> Result<CheckResponse, String> {
    let exchange = async {
        client
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        client
            .unary(tonic::Request::new(request), path.clone(), RawCodec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    tokio::time::timeout(RPC_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {RPC_TIMEOUT:?}")))
}
