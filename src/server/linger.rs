//! Lingering close for the HTTP listener: a TCP stream whose shutdown, after sending its
//! FIN, reads and discards what the client still sends, for a bounded time and number of
//! bytes, before the socket is closed.
//!
//! Why: the listener may answer before it has read a request's body (a 413 to an upload
//! over the size limit is sent without reading it). Closing a socket with unread data makes
//! the kernel send a reset (RFC 1122, 4.2.2.13), and a reset that reaches the client while
//! it is still sending can destroy the reply before the client reads it: the client sees
//! "connection reset" instead of the 413. Draining first lets the reply arrive; the bounds
//! keep a client that never stops sending from holding the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Most bytes read and discarded after the reply; past them the socket is closed anyway.
pub const MAX_LINGER_BYTES: usize = 16 * 1024 * 1024;

/// A TCP stream that lingers on shutdown (see the module's documentation).
#[derive(Debug)]
pub struct Lingering {
    stream: TcpStream,
    /// Longest the shutdown drains for.
    limit: Duration,
    /// Set once the FIN is sent: when draining stops, and how much was discarded so far.
    draining: Option<(Pin<Box<Sleep>>, usize)>,
}

impl Lingering {
    /// Wraps `stream`; its shutdown drains for at most `limit`.
    pub fn new(stream: TcpStream, limit: Duration) -> Lingering {
        Lingering {
            stream,
            limit,
            draining: None,
        }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    /// Sends the FIN, then drains until the client closes too, an error, `limit` or
    /// [`MAX_LINGER_BYTES`]. Only the FIN's own failure is an error: the reply is out.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (deadline, discarded) = match &mut this.draining {
            Some(draining) => draining,
            None => {
                ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
                this.draining
                    .insert((Box::pin(tokio::time::sleep(this.limit)), 0))
            }
        };
        let mut scratch = [0u8; 8192];
        loop {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.stream).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => {
                    *discarded += buf.filled().len();
                    if *discarded >= MAX_LINGER_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                // End of stream, or the client reset: nothing is left to protect.
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const REPLY: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\n\r\n";

    async fn pair(limit: Duration) -> (Lingering, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (Lingering::new(server, limit), client)
    }

    /// A client still sending when the server closes is not reset: it can send the rest
    /// and then read the reply. Without the drain, the unread bytes make the close a reset:
    /// the client's writes fail, and a client that stops at a failed write (as hyper's
    /// does) loses the reply.
    #[tokio::test]
    async fn a_client_still_sending_is_not_reset_and_reads_the_reply() {
        let (mut server, mut client) = pair(Duration::from_secs(5)).await;
        // The client sends more than the socket buffers hold, and only then reads.
        let sender = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = Ok(());
            for _ in 0..64 {
                sent = client.write_all(&chunk).await;
                if sent.is_err() {
                    break;
                }
            }
            let mut reply = Vec::new();
            let read = client.read_to_end(&mut reply).await.map(|_| reply);
            (sent, read)
        });
        let mut first = [0u8; 1024];
        server.read_exact(&mut first).await.expect("first bytes");
        server.write_all(REPLY).await.expect("reply");
        server.shutdown().await.expect("shutdown");
        drop(server);
        let (sent, read) = tokio::time::timeout(Duration::from_secs(10), sender)
            .await
            .expect("the client finished")
            .expect("client task");
        assert!(sent.is_ok(), "the client was reset while sending: {sent:?}");
        assert_eq!(read.expect("the reply").as_slice(), REPLY);
    }

    /// A client that keeps the connection open and sends nothing holds it only `limit`.
    #[tokio::test]
    async fn the_drain_ends_at_its_time_limit() {
        let (mut server, _client) = pair(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), server.shutdown())
            .await
            .expect("the drain ended")
            .expect("shutdown");
        let held = started.elapsed();
        assert!(held >= Duration::from_millis(190), "ended early: {held:?}");
    }
}
