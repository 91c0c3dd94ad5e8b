//! The servers under test as child processes: starting them, waiting for gRPC health to say
//! SERVING, and reading their CPU time and memory from `/proc` (once, or sampled on a thread
//! for the peak of an interval). Killed when dropped.

use serde::Serialize;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A running server process and the address it serves gRPC on.
pub struct Server {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `portcullis serve --config <config>`, its output going to `log`.
    pub fn portcullis(
        exe: &Path,
        config: &Path,
        addr: SocketAddr,
        log: &Path,
    ) -> Result<Server, String> {
        let out = std::fs::File::create(log)
            .map_err(|e| format!("{}: cannot create: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: cannot start: {e}", exe.display()))?;
        Ok(Server {
            name: "portcullis",
            addr,
            child,
        })
    }

    /// Starts this tool as the no-op Check server and reads the address it bound from the
    /// first line of its output. Its stdin stays open: the server exits when it closes, so
    /// it cannot outlive this process.
    pub fn noop(log: &Path) -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let err = std::fs::File::create(log)
            .map_err(|e| format!("{}: cannot create: {e}", log.display()))?;
        let mut child = Command::new(&exe)
            .args(["--serve-noop", "127.0.0.1:0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: cannot start: {e}", exe.display()))?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| std::io::BufReader::new(out).read_line(&mut line));
        let addr = match read {
            Some(Ok(_)) => line.trim().parse::<SocketAddr>().ok(),
            _ => None,
        };
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "no-op server did not report its address (got {line:?}); see {}",
                log.display()
            ));
        };
        Ok(Server {
            name: "noop",
            addr,
            child,
        })
    }

    /// Waits until gRPC health answers SERVING for the whole server, or `limit` passes, or
    /// the process exits.
    pub async fn wait_serving(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{} exited during start-up: {status}", self.name));
            }
            if self.health().await == Some(ServingStatus::Serving) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not report SERVING on {} within {limit:?}",
                    self.name, self.addr
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn health(&self) -> Option<ServingStatus> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(answer.into_inner().status).ok()
    }
}

/// A free port for the Portcullis child: bound, read and released. Another process could
/// take it in between; start-up then fails clearly and the run can be repeated.
pub fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// CPU time (user + system, all threads) of process `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // proc(5): the command name is in parentheses and may contain spaces; fields after it
    // start at field 3 (state), so utime (14) and stime (15) are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64)
            .ok_or_else(|| format!("{path}: unexpected format"))
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks_per_second())
}

/// `USER_HZ`, the unit of `/proc/<pid>/stat` times: from `getconf CLK_TCK`, else 100 (its
/// value on every mainstream Linux architecture).
fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|hz| *hz > 0.0)
            .unwrap_or(100.0)
    })
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// `VmRSS`: resident now, KiB.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident size so far, KiB.
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Result<Memory, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| format!("{path}: no {name}"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// Resets a process's `VmHWM` to its current RSS (`/proc/<pid>/clear_refs`, value 5, Linux
/// 4.0 and later), so that the next reading is the peak since now. False when refused.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Reads a process's `VmRSS` every `every` on a thread of its own (a busy runtime cannot
/// delay it) until [`RssSampler::finish`] or drop, and keeps the largest.
pub struct RssSampler {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let done = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let done = done.clone();
            move || {
                let mut peak = 0;
                // The process may exit while sampled (a start-up that fails): keep the peak.
                while !done.load(Ordering::Relaxed) {
                    if let Ok(m) = memory(pid) {
                        peak = peak.max(m.rss_kib);
                    }
                    std::thread::sleep(every);
                }
                peak
            }
        });
        RssSampler {
            done,
            thread: Some(thread),
        }
    }

    /// The largest `VmRSS` seen, KiB (0 when none could be read).
    pub fn finish(mut self) -> u64 {
        self.done.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}
