//! The gRPC door's transport: a TCP or Unix socket listener, with TLS (mutual with
//! `client_ca`) when `[server.tls]` is set. A listen address and TLS settings in; out, a
//! stream of ready connections for tonic. The certificate, key and client CA are re-read
//! when their files change; connections already open keep the configuration they began with.

use crate::config::{Listen, TlsSettings};
use crate::ratelog::RateLog;
use crate::reload::{WatchGuard, watch_file};
use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Longest a client may take to finish its TLS handshake before it is dropped (the
/// default of `[limits] tls_handshake_timeout`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most TLS handshakes in progress at once, apart from established connections (the
/// default of `[limits] max_tls_handshakes`); past it, a new connection takes the place of
/// the handshake that has waited the longest.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// The shortest time a handshake must have waited to be evicted for a new connection. A
/// good client's handshake takes a few round trips, far less; the bound keeps a flood of
/// new connections from evicting every handshake before it can finish (a full listener
/// turns over at most `max_tls_handshakes` per this time).
pub const MIN_HANDSHAKE_STALL: Duration = Duration::from_millis(100);
/// Log budget for what an outsider can make the listener log, per kind.
const LOG_INTERVAL: Duration = Duration::from_secs(30);
static HANDSHAKE_FAILED: RateLog = RateLog::new("TLS handshake failures", 5, LOG_INTERVAL);
static HANDSHAKE_TIMED_OUT: RateLog = RateLog::new("TLS handshake timeouts", 5, LOG_INTERVAL);
static HANDSHAKE_CLOSED: RateLog = RateLog::new(
    "connections closed during the TLS handshake",
    5,
    LOG_INTERVAL,
);
static HANDSHAKE_EVICTED: RateLog = RateLog::new("TLS handshakes evicted", 5, LOG_INTERVAL);
static ACCEPT_FAILED: RateLog = RateLog::new("gRPC accept failures", 5, LOG_INTERVAL);
/// Pause after an accept error that is not about one connection (e.g. out of file
/// descriptors), so a persistent one cannot spin the accept loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Cap on each certificate, key or CA file read.
const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// Permissions of the Unix socket: owner and group may connect.
#[cfg(unix)]
const SOCKET_MODE: u32 = 0o660;

/// Called after each TLS reload attempt that found the files changed (or unreadable):
/// `true` when the new configuration is in use, `false` when it was refused and the last
/// good one kept.
pub type ReloadHook = Arc<dyn Fn(bool) + Send + Sync>;

/// Called for each connection the listener drops on its own (for metrics), with what
/// happened: "handshake_failed", "handshake_timeout" or "evicted".
pub type EventHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Binds the gRPC listener. Returns the connections to serve and the bound address for
/// display (`127.0.0.1:41234`, `unix:/run/portcullis.sock`). With `tls`, the certificate,
/// key and client CA must load now; later changes are picked up while it runs.
pub async fn bind(
    listen: &Listen,
    tls: Option<&TlsSettings>,
) -> Result<(Incoming, String), String> {
    bind_with_hook(listen, tls, Arc::new(|_| {})).await
}

/// [`bind`], reporting each TLS reload to `on_reload` (for metrics).
pub async fn bind_with_hook(
    listen: &Listen,
    tls: Option<&TlsSettings>,
    on_reload: ReloadHook,
) -> Result<(Incoming, String), String> {
    // TLS material first: a bad certificate should not leave a socket file behind.
    let (tls, watches) = match tls {
        Some(settings) => {
            let reloader = Arc::new(TlsReloader::load(settings.clone(), on_reload)?);
            let watches = reloader.watch()?;
            // A change between the first read and the start of the watch is not missed.
            reloader.reload();
            (Some(reloader), watches)
        }
        None => (None, Vec::new()),
    };
    let (listener, shown) = match listen {
        Listen::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let local = listener
                .local_addr()
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            (Listener::Tcp(listener), local.to_string())
        }
        #[cfg(unix)]
        Listen::Unix(path) => {
            let (listener, file) = unix::bind(path).await?;
            (
                Listener::Unix {
                    listener,
                    _file: file,
                },
                listen.to_string(),
            )
        }
        #[cfg(not(unix))]
        Listen::Unix(path) => {
            return Err(format!(
                "unix:{}: Unix sockets are not supported on this platform",
                path.display()
            ));
        }
    };
    let incoming = Incoming {
        listener,
        tls,
        handshakes: JoinSet::new(),
        started: VecDeque::new(),
        max_handshakes: MAX_PENDING_HANDSHAKES,
        handshake_timeout: HANDSHAKE_TIMEOUT,
        waiting: None,
        recheck: None,
        backoff: None,
        on_event: Arc::new(|_| {}),
        _watches: watches,
    };
    Ok((incoming, shown))
}

/// The accepted connections, ready to serve: pass it to tonic's
/// `serve_with_incoming_shutdown`. It never yields an error: a failed accept is logged
/// (and, if it is not about one connection, followed by a pause), and a failed or slow
/// TLS handshake drops only that connection.
///
/// Handshakes run concurrently, apart from established connections, each bounded in time
/// (`[limits] tls_handshake_timeout`) and together in number (`max_tls_handshakes`). When
/// every handshake slot is taken, a new connection takes the place of the handshake that
/// has waited the longest (at least [`MIN_HANDSHAKE_STALL`]): clients that connect and
/// send nothing, or trickle their handshake, are the ones dropped, and a good client
/// finishes its handshake at once instead of waiting for their timeouts. Only one accepted
/// connection waits for a slot; the next ones wait in the kernel's backlog.
///
/// Dropping it closes the listener, aborts handshakes in progress, stops watching the
/// TLS files and removes the Unix socket file.
pub struct Incoming {
    listener: Listener,
    tls: Option<Arc<TlsReloader>>,
    handshakes: JoinSet<Result<Connection, Dropped>>,
    /// The handshakes in progress (and some finished ones), oldest first: when each began.
    started: VecDeque<(Instant, AbortHandle)>,
    max_handshakes: usize,
    handshake_timeout: Duration,
    /// An accepted connection waiting for a handshake slot.
    waiting: Option<Plain>,
    /// When the oldest handshake becomes evictable, while `waiting` waits for it.
    recheck: Option<Pin<Box<tokio::time::Sleep>>>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    on_event: EventHook,
    _watches: Vec<WatchGuard>,
}

impl Incoming {
    /// A handle to re-read the TLS files on demand (e.g. on SIGHUP); `None` without TLS.
    pub fn tls_reloader(&self) -> Option<TlsReload> {
        self.tls.clone().map(TlsReload)
    }

    /// Caps the TLS handshakes in progress at once (default [`MAX_PENDING_HANDSHAKES`],
    /// at least 1).
    pub fn max_pending_handshakes(mut self, max: usize) -> Incoming {
        self.max_handshakes = max.max(1);
        self
    }

    /// Takes the handshake bounds of `[limits]`: `max_tls_handshakes` and
    /// `tls_handshake_timeout`.
    pub fn with_limits(mut self, limits: &crate::config::Limits) -> Incoming {
        self.handshake_timeout = limits.tls_handshake_timeout;
        self.max_pending_handshakes(limits.max_tls_handshakes)
    }

    /// Reports each connection the listener drops on its own to `hook` (for metrics).
    pub fn on_event(mut self, hook: EventHook) -> Incoming {
        self.on_event = hook;
        self
    }

    /// Starts the handshake of `plain` if a slot is free or can be freed by evicting the
    /// handshake that has waited the longest (at least [`MIN_HANDSHAKE_STALL`]); gives
    /// `plain` back otherwise.
    fn start_handshake(&mut self, tls: &TlsReloader, plain: Plain, now: Instant) -> Option<Plain> {
        // Forget handshakes that ended; the front is then the oldest in progress.
        while self
            .started
            .front()
            .is_some_and(|(_, task)| task.is_finished())
        {
            self.started.pop_front();
        }
        if self.handshakes.len() >= self.max_handshakes {
            match self.started.front() {
                Some((began, _))
                    if now.saturating_duration_since(*began) >= MIN_HANDSHAKE_STALL =>
                {
                    if let Some((began, task)) = self.started.pop_front() {
                        // Its join reports the cancellation (counted and logged there).
                        task.abort();
                        HANDSHAKE_EVICTED.event(|| {
                            tracing::info!(
                                "TLS handshake slots full: dropped a handshake unfinished after {}",
                                humantime::format_duration(now.saturating_duration_since(began))
                            );
                        });
                    }
                }
                _ => return Some(plain),
            }
        }
        let acceptor = TlsAcceptor::from(tls.current.load_full());
        let task = self
            .handshakes
            .spawn(handshake(acceptor, plain, self.handshake_timeout));
        self.started.push_back((now, task));
        // Finished handshakes in the middle are forgotten now and then, keeping it bounded.
        if self.started.len() > 2 * self.max_handshakes {
            self.started.retain(|(_, task)| !task.is_finished());
        }
        None
    }
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("tls", &self.tls.is_some())
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Every `Pending` below leaves a waker with each source that can make progress:
        // the handshakes (polled first, each time round), the pause, the wait for a slot
        // or the listener.
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Ok(conn)))) => return Poll::Ready(Some(Ok(conn))),
                // Failed (already logged): its slot is free, so accept again.
                Poll::Ready(Some(Ok(Err(dropped)))) => {
                    if let Some(event) = dropped.event() {
                        (this.on_event)(event);
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) if e.is_cancelled() => {
                    (this.on_event)("evicted");
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::error!("TLS handshake task failed: {e}");
                    continue;
                }
                // An empty set is not the end of the stream: the listener is still open.
                Poll::Ready(None) | Poll::Pending => {}
            }
            if let Some(pause) = &mut this.backoff {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
            }
            if let Some(plain) = this.waiting.take() {
                let Some(tls) = this.tls.clone() else {
                    return Poll::Ready(Some(Ok(Connection(Inner::Plain(plain)))));
                };
                let now = Instant::now();
                match this.start_handshake(&tls, plain, now) {
                    None => {
                        this.recheck = None;
                        continue;
                    }
                    Some(plain) => {
                        this.waiting = Some(plain);
                        // Full, and the oldest handshake is too recent to evict: look again
                        // when it is old enough (or when a handshake ends, whose waker is
                        // registered above).
                        let at = this
                            .started
                            .front()
                            .map_or(now, |(began, _)| *began + MIN_HANDSHAKE_STALL);
                        let recheck = this
                            .recheck
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
                        recheck.as_mut().reset(at.into());
                        if recheck.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        continue;
                    }
                }
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok(plain)) => this.waiting = Some(plain),
                Poll::Ready(Err(e)) if is_connection_error(&e) => {
                    ACCEPT_FAILED.event(|| {
                        tracing::debug!("connection lost before it was accepted: {e}");
                    });
                }
                Poll::Ready(Err(e)) => {
                    ACCEPT_FAILED.event(|| {
                        tracing::error!(
                            "cannot accept connections, pausing for {}: {e}",
                            humantime::format_duration(ACCEPT_ERROR_BACKOFF)
                        );
                    });
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_BACKOFF)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Errors that concern only the connection being accepted (hyper's list).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Why a handshake ended without a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// The client closed before a word (load balancer and orchestrator probes do).
    Closed,
    Failed,
    TimedOut,
}

impl Dropped {
    /// The event reported to the [`EventHook`], if any.
    fn event(self) -> Option<&'static str> {
        match self {
            Dropped::Closed => None,
            Dropped::Failed => Some("handshake_failed"),
            Dropped::TimedOut => Some("handshake_timeout"),
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    io: Plain,
    limit: Duration,
) -> Result<Connection, Dropped> {
    let peer = io.describe_peer();
    match tokio::time::timeout(limit, acceptor.accept(io)).await {
        Ok(Ok(tls)) => Ok(Connection(Inner::Tls(Box::new(tls)))),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            HANDSHAKE_CLOSED.event(|| {
                tracing::debug!(peer = %peer, "connection closed during the TLS handshake: {e}");
            });
            Err(Dropped::Closed)
        }
        Ok(Err(e)) => {
            HANDSHAKE_FAILED.event(|| {
                tracing::warn!(peer = %peer, "TLS handshake failed, connection dropped: {e}");
            });
            Err(Dropped::Failed)
        }
        Err(_) => {
            HANDSHAKE_TIMED_OUT.event(|| {
                tracing::warn!(
                    peer = %peer,
                    "TLS handshake not finished within {}, connection dropped",
                    humantime::format_duration(limit)
                );
            });
            Err(Dropped::TimedOut)
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    #[cfg(unix)]
    Unix {
        listener: tokio::net::UnixListener,
        /// Removes the socket file when the listener goes away.
        _file: unix::SocketFile,
    },
}

impl Listener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Plain>> {
        match self {
            Listener::Tcp(l) => l.poll_accept(cx).map_ok(|(stream, _)| {
                // gRPC is request/response over small frames: do not wait to coalesce them.
                let _ = stream.set_nodelay(true);
                Plain::Tcp(stream)
            }),
            #[cfg(unix)]
            Listener::Unix { listener, .. } => listener
                .poll_accept(cx)
                .map_ok(|(stream, _)| Plain::Unix(stream)),
        }
    }
}

/// One accepted socket, before any TLS.
#[derive(Debug)]
enum Plain {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

impl Plain {
    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Plain::Tcp(s) => s.connect_info(),
            #[cfg(unix)]
            Plain::Unix(_) => TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
        }
    }

    fn describe_peer(&self) -> String {
        match self {
            Plain::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "unknown".into(), |a| a.to_string()),
            #[cfg(unix)]
            Plain::Unix(_) => "unix socket".into(),
        }
    }
}

/// Forwards an I/O call to whichever stream `$self` holds.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self.get_mut() {
            Plain::Tcp($s) => $call,
            #[cfg(unix)]
            Plain::Unix($s) => $call,
        }
    };
}

impl AsyncRead for Plain {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Plain {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Plain::Tcp(s) => s.is_write_vectored(),
            #[cfg(unix)]
            Plain::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// An accepted connection, with TLS already established when the listener uses it.
#[derive(Debug)]
pub struct Connection(Inner);

#[derive(Debug)]
enum Inner {
    Plain(Plain),
    Tls(Box<TlsStream<Plain>>),
}

impl Connected for Connection {
    /// The TCP addresses, so `tonic::Request::remote_addr` works; none on a Unix socket.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match &self.0 {
            Inner::Plain(p) => p.connect_info(),
            Inner::Tls(t) => t.get_ref().0.connect_info(),
        }
    }
}

macro_rules! delegate_conn {
    ($self:ident, $s:ident => $call:expr) => {
        match &mut $self.get_mut().0 {
            Inner::Plain($s) => $call,
            Inner::Tls($s) => $call,
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate_conn!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate_conn!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate_conn!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_conn!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_conn!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Re-reads the listener's TLS files now; keeps the current configuration if they did not
/// change or do not load (logged, and reported to the reload hook).
#[derive(Clone)]
pub struct TlsReload(Arc<TlsReloader>);

impl TlsReload {
    /// Blocks while the files are read and parsed (small files; call from
    /// `spawn_blocking` or a thread if that matters).
    pub fn reload(&self) {
        self.0.reload();
    }
}

impl std::fmt::Debug for TlsReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TlsReload")
            .field(&self.0.settings.cert)
            .finish()
    }
}

/// The TLS configuration in use, and how to rebuild it from its files.
struct TlsReloader {
    settings: TlsSettings,
    current: ArcSwap<ServerConfig>,
    /// What the last attempt found, so a change notice that changed nothing (several
    /// watches firing for one update, the same broken or missing file seen twice)
    /// neither rebuilds nor logs. Also serialises reloads.
    last_seen: Mutex<Seen>,
    on_reload: ReloadHook,
}

#[derive(PartialEq, Eq)]
enum Seen {
    /// The SHA-256 of the files' contents.
    Files([u8; 32]),
    /// Why they could not be read.
    Unreadable(String),
}

/// The bytes of the TLS files, read once per attempt.
struct TlsFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl TlsReloader {
    fn load(settings: TlsSettings, on_reload: ReloadHook) -> Result<TlsReloader, String> {
        let files = TlsFiles::read(&settings)?;
        let config = files.server_config(&settings)?;
        Ok(TlsReloader {
            current: ArcSwap::from_pointee(config),
            last_seen: Mutex::new(Seen::Files(files.digest())),
            settings,
            on_reload,
        })
    }

    /// Watches each TLS file; a change to any of them triggers a reload of all three.
    fn watch(self: &Arc<Self>) -> Result<Vec<WatchGuard>, String> {
        [Some(&self.settings.cert), Some(&self.settings.key)]
            .into_iter()
            .chain([self.settings.client_ca.as_ref()])
            .flatten()
            .map(|file| {
                let reloader = Arc::clone(self);
                watch_file(file, move || reloader.reload())
            })
            .collect()
    }

    fn reload(&self) {
        // A poisoned lock only means an earlier reload panicked; the digest is still valid.
        let mut last_seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        let read = TlsFiles::read(&self.settings);
        let seen = match &read {
            Ok(files) => Seen::Files(files.digest()),
            Err(e) => Seen::Unreadable(e.clone()),
        };
        if seen == *last_seen {
            return;
        }
        *last_seen = seen;
        match read.and_then(|files| files.server_config(&self.settings)) {
            Ok(config) => {
                self.current.store(Arc::new(config));
                tracing::info!(
                    cert = %self.settings.cert.display(),
                    "TLS certificate reloaded; new connections use it"
                );
                (self.on_reload)(true);
            }
            Err(e) => {
                tracing::error!("TLS certificate not reloaded, keeping the last good one: {e}");
                (self.on_reload)(false);
            }
        }
    }
}

impl TlsFiles {
    fn read(settings: &TlsSettings) -> Result<TlsFiles, String> {
        Ok(TlsFiles {
            cert: read_capped("server.tls.cert", &settings.cert)?,
            key: read_capped("server.tls.key", &settings.key)?,
            client_ca: settings
                .client_ca
                .as_ref()
                .map(|p| read_capped("server.tls.client_ca", p))
                .transpose()?,
        })
    }

    fn digest(&self) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            match part {
                Some(bytes) => {
                    ctx.update(&[1]);
                    ctx.update(&(bytes.len() as u64).to_be_bytes());
                    ctx.update(bytes);
                }
                None => ctx.update(&[0]),
            }
        }
        let mut out = [0; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// A rustls server configuration (aws-lc-rs, TLS 1.2 and 1.3, ALPN `h2`) requiring a
    /// client certificate that chains to `client_ca` when one is configured.
    fn server_config(&self, settings: &TlsSettings) -> Result<ServerConfig, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cert_at = format!("server.tls.cert \"{}\"", settings.cert.display());
        let key_at = format!("server.tls.key \"{}\"", settings.key.display());
        let chain = parse_certs(&cert_at, &self.cert)?;
        // Only the kind of failure is reported, never key material.
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| format!("{key_at}: no usable PEM private key: {e}"))?;
        let verifier = match (&settings.client_ca, &self.client_ca) {
            (Some(path), Some(bytes)) => {
                let ca_at = format!("server.tls.client_ca \"{}\"", path.display());
                let mut roots = RootCertStore::empty();
                for cert in parse_certs(&ca_at, bytes)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{ca_at}: not a usable CA certificate: {e}"))?;
                }
                // SECURITY: builds a verifier that requires a client certificate
                // (no `allow_unauthenticated`): the handshake fails without one.
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("{ca_at}: {e}"))?
            }
            _ => WebPkiClientVerifier::no_client_auth(),
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_client_cert_verifier(verifier)
            // Fails when the key does not belong to the first certificate.
            .with_single_cert(chain, key)
            .map_err(|e| format!("{cert_at} with {key_at}: {e}"))?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn parse_certs(at: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{at}: unreadable PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{at}: no PEM certificate found"));
    }
    Ok(certs)
}

fn read_capped(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    // Not a FIFO or device (it would hang the reload), and capped.
    crate::files::read_capped(path, MAX_PEM_BYTES).map_err(|e| format!("{what}: {e}"))
}

#[cfg(unix)]
mod unix {
    //! Binding a Unix socket without a moment of wider permissions, and without
    //! clobbering anything but a stale socket.

    use super::SOCKET_MODE;
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::time::Duration;
    use tokio::net::{UnixListener, UnixStream};

    /// The socket path we created; removed on drop if it is still ours.
    #[derive(Debug)]
    pub(super) struct SocketFile {
        path: PathBuf,
        id: (u64, u64),
    }

    impl Drop for SocketFile {
        fn drop(&mut self) {
            if let Ok(meta) = std::fs::symlink_metadata(&self.path)
                && (meta.dev(), meta.ino()) == self.id
            {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    /// Binds `path` with mode 0660. The socket is created in a fresh private (0700)
    /// directory next to it, given its mode, then renamed into place, so it is never
    /// reachable with the umask's permissions. An existing socket nobody listens on is
    /// replaced; anything else at `path` is an error.
    pub(super) async fn bind(path: &Path) -> Result<(UnixListener, SocketFile), String> {
        let at = || format!("unix:{}", path.display());
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                let probe =
                    tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await;
                if !matches!(probe, Ok(Err(_))) {
                    return Err(format!(
                        "{}: another process is listening on this socket",
                        at()
                    ));
                }
                tracing::info!("{}: replacing a stale socket file", at());
            }
            Ok(_) => {
                return Err(format!(
                    "{}: exists and is not a socket; refusing to replace it",
                    at()
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", at())),
        }
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Short on purpose: socket paths are limited to about 100 bytes.
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let staging = parent.join(format!(".pc{}", &nonce[..8]));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| format!("{}: cannot create {}: {e}", at(), staging.display()))?;
        let staged = staging.join("s");
        let bound = (|| {
            let listener = UnixListener::bind(&staged)?;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(SOCKET_MODE))?;
            std::fs::rename(&staged, path)?;
            let meta = std::fs::symlink_metadata(path)?;
            Ok::<_, std::io::Error>((listener, (meta.dev(), meta.ino())))
        })();
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&staging);
        let (listener, id) = bound.map_err(|e| format!("{}: cannot listen: {e}", at()))?;
        Ok((
            listener,
            SocketFile {
                path: path.to_path_buf(),
                id,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn broken_tls_files_are_refused_with_their_setting_named() {
        use crate::demo::{Authority, LeafSpec};
        let ca = Authority::root("listen test CA");
        let server = ca.issue(&LeafSpec::loopback_server());
        let other = ca.issue(&LeafSpec::loopback_server());
        let settings = TlsSettings {
            cert: PathBuf::from("cert.pem"),
            key: PathBuf::from("key.pem"),
            client_ca: Some(PathBuf::from("ca.pem")),
        };
        let files = |cert: &str, key: &str, ca: &str| TlsFiles {
            cert: cert.as_bytes().to_vec(),
            key: key.as_bytes().to_vec(),
            client_ca: Some(ca.as_bytes().to_vec()),
        };
        let good = files(&server.pem, &server.key_pem, &ca.cert_pem());
        let config = good.server_config(&settings).expect("valid files");
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        let cases = [
            (
                "empty cert",
                files("", &server.key_pem, &ca.cert_pem()),
                "server.tls.cert",
            ),
            (
                "not PEM",
                files("garbage", &server.key_pem, &ca.cert_pem()),
                "server.tls.cert",
            ),
            (
                "no key",
                files(&server.pem, "", &ca.cert_pem()),
                "server.tls.key",
            ),
            (
                "key of another cert",
                files(&server.pem, &other.key_pem, &ca.cert_pem()),
                "server.tls.key",
            ),
            (
                "empty CA",
                files(&server.pem, &server.key_pem, ""),
                "server.tls.client_ca",
            ),
        ];
        for (name, files, needle) in cases {
            let err = files.server_config(&settings).expect_err(name);
            assert!(err.contains(needle), "{name}: {err}");
            assert!(!err.contains("PRIVATE KEY"), "{name} leaks the key: {err}");
        }
    }

    #[test]
    fn digest_tells_apart_where_the_bytes_are() {
        let d = |cert: &str, key: &str, ca: Option<&str>| {
            TlsFiles {
                cert: cert.into(),
                key: key.into(),
                client_ca: ca.map(Into::into),
            }
            .digest()
        };
        assert_eq!(d("a", "b", None), d("a", "b", None));
        assert_ne!(d("ab", "", None), d("a", "b", None));
        assert_ne!(d("a", "b", None), d("a", "b", Some("")));
    }
}
