//! Connection slots that keep room for good clients: the HTTP listener admits at most
//! `max` connections, and when all are taken a new connection takes the place of the one
//! that has been waiting on its client the longest. Accepted connections in; out, a
//! [`Slot`] per admitted connection, which says when it was evicted, and an [`Activity`]
//! that its I/O ([`Tracked`]) and its request handlers report to.
//!
//! Why: a time bound on each read is not enough. An attacker who opens more connections
//! than there are slots, and trickles bytes on each, can cycle them so that every slot is
//! always taken by one of his, each within its time bounds, and good clients wait in the
//! kernel's backlog (GitHub issue 12, finding 7). Evicting the connection stalled the
//! longest makes the attacker's connections the ones that go: a good client sends its
//! request at once, so it is never the one stalled the longest for long.
//!
//! A connection is *waiting on its client* from its first I/O that would block (a read
//! for the next request or the rest of one, a write the client does not read) until the
//! server has a whole request to work on ([`Activity::busy`]); bytes that trickle in do
//! not reset it, so a trickle of one byte a second is as evictable as silence. A connection
//! the server is working for is never evicted.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// How often a full listener with nothing to evict looks again (a slot freed wakes it
/// at once).
const RECHECK: Duration = Duration::from_millis(25);

/// The connection slots of one listener (see the module's documentation).
#[derive(Debug)]
pub struct Slots {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    max: usize,
    /// The shortest wait on the client that makes a connection evictable.
    min_stall: Duration,
    /// Times are kept as milliseconds since this instant (plus one; zero is "not waiting").
    epoch: Instant,
    table: Mutex<Table>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    entries: HashMap<u64, Arc<Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Since when the connection has been waiting on its client, as `Shared::stamp`; 0
    /// when it is not.
    waiting_since: AtomicU64,
    /// Requests the server is working on.
    busy: AtomicUsize,
    evicted: Notify,
}

impl Entry {
    fn server_turn(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.waiting_since.store(0, Ordering::Release);
    }
}

/// An admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    shared: Arc<Shared>,
    id: u64,
    entry: Arc<Entry>,
}

/// What [`Slots::admit`] did to make room.
#[derive(Debug)]
pub struct Admitted {
    pub slot: Slot,
    /// When a connection was evicted to make room: how long it had waited on its client.
    pub evicted: Option<Duration>,
}

impl Slots {
    /// At most `max` connections (at least 1); a connection must have waited on its client
    /// at least `min_stall` to be evicted.
    pub fn new(max: usize, min_stall: Duration) -> Slots {
        Slots {
            shared: Arc::new(Shared {
                max: max.max(1),
                min_stall,
                epoch: Instant::now(),
                table: Mutex::new(Table::default()),
                freed: Notify::new(),
            }),
        }
    }

    /// A slot for a new connection: a free one, or the one of the connection that has
    /// waited on its client the longest (at least `min_stall`), which is told to close.
    /// When neither exists (every connection is being served, or has been waiting only
    /// briefly), waits until one does.
    pub async fn admit(&self) -> Admitted {
        loop {
            if let Some(admitted) = self.try_admit(Instant::now()) {
                return admitted;
            }
            tokio::select! {
                () = self.shared.freed.notified() => {}
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    fn try_admit(&self, now: Instant) -> Option<Admitted> {
        let shared = &self.shared;
        // A poisoned lock only means a panic elsewhere while it was held: the table is
        // still a table.
        let mut table = shared.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut evicted = None;
        if table.entries.len() >= shared.max {
            let now_stamp = shared.stamp(now);
            let candidates = table.entries.iter().map(|(id, e)| {
                (
                    *id,
                    e.waiting_since.load(Ordering::Acquire),
                    e.busy.load(Ordering::Acquire),
                )
            });
            let (victim, since) = longest_stalled(candidates, now_stamp, millis(shared.min_stall))?;
            if let Some(entry) = table.entries.remove(&victim) {
                entry.evicted.notify_one();
            }
            evicted = Some(Duration::from_millis(now_stamp.saturating_sub(since)));
        }
        let id = table.next_id;
        table.next_id += 1;
        let entry = Arc::new(Entry::default());
        // The client has the turn first: it must send a request.
        entry
            .waiting_since
            .store(shared.stamp(now), Ordering::Release);
        table.entries.insert(id, entry.clone());
        Some(Admitted {
            slot: Slot {
                shared: shared.clone(),
                id,
                entry,
            },
            evicted,
        })
    }
}

impl Shared {
    fn stamp(&self, at: Instant) -> u64 {
        millis(at.saturating_duration_since(self.epoch)).saturating_add(1)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Of `(id, waiting_since, busy)` rows, the one waiting on its client the longest, if it
/// has waited at least `min` (all times in the same milliseconds; 0 is "not waiting"):
/// its id and since when it has waited.
fn longest_stalled(
    rows: impl Iterator<Item = (u64, u64, usize)>,
    now: u64,
    min: u64,
) -> Option<(u64, u64)> {
    rows.filter(|&(_, since, busy)| busy == 0 && since != 0 && now.saturating_sub(since) >= min)
        .min_by_key(|&(id, since, _)| (since, id))
        .map(|(id, since, _)| (id, since))
}

impl Slot {
    /// Completes when this connection was evicted to make room for another.
    pub async fn evicted(&self) {
        self.entry.evicted.notified().await;
    }

    /// The handle its I/O and request handlers report to.
    pub fn activity(&self) -> Activity {
        Activity {
            entry: self.entry.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.shared.table.lock().unwrap_or_else(|p| p.into_inner());
        // An evicted connection's place was already given to another.
        if table
            .entries
            .get(&self.id)
            .is_some_and(|e| Arc::ptr_eq(e, &self.entry))
        {
            table.entries.remove(&self.id);
        }
        drop(table);
        self.shared.freed.notify_one();
    }
}

/// What a connection reports about whose turn it is: its I/O says when it would block,
/// its request handlers when the server has a request to work on. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Activity {
    entry: Arc<Entry>,
    shared: Arc<Shared>,
}

impl Activity {
    /// The connection's I/O would block: unless the server is working on a request, the
    /// connection is now waiting on its client (if it was not already).
    pub fn would_block(&self) {
        if self.entry.busy.load(Ordering::Acquire) == 0 {
            let now = self.shared.stamp(Instant::now());
            let _ = self.entry.waiting_since.compare_exchange(
                0,
                now,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// The server has a whole request to work on, until the guard is dropped: the
    /// connection is not waiting on its client, and is not evicted.
    pub fn busy(&self) -> Busy {
        self.entry.server_turn();
        Busy(self.entry.clone())
    }

    /// Inside [`Activity::busy`], the request needs more from the client (its body) until
    /// the guard is dropped: the turn is the client's again meanwhile.
    pub fn client_turn(&self) -> ClientTurn {
        self.entry.busy.fetch_sub(1, Ordering::AcqRel);
        ClientTurn(self.clone())
    }
}

/// See [`Activity::busy`].
#[derive(Debug)]
pub struct Busy(Arc<Entry>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// See [`Activity::client_turn`].
#[derive(Debug)]
pub struct ClientTurn(Activity);

impl Drop for ClientTurn {
    fn drop(&mut self) {
        // The server's turn again: what it waited for is in.
        self.0.entry.server_turn();
    }
}

/// A connection's I/O that reports to its [`Activity`] each time it would block.
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Activity) -> Tracked<S> {
        Tracked { inner, activity }
    }
}

impl<S> Tracked<S> {
    fn report<T>(&self, poll: Poll<T>) -> Poll<T> {
        if poll.is_pending() {
            self.activity.would_block();
        }
        poll
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.report(poll)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.report(poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.report(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.report(poll)
    }

    /// A lingering close waits on the client too: evictable like any other wait.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.report(poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_waiting_idle_connection_is_chosen() {
        // (rows, now, min, expected)
        type Case = (&'static [(u64, u64, usize)], u64, u64, Option<(u64, u64)>);
        let table: [Case; 7] = [
            (&[], 1000, 100, None),
            // The oldest waiter, not the oldest connection.
            (
                &[(1, 500, 0), (2, 300, 0), (3, 800, 0)],
                1000,
                100,
                Some((2, 300)),
            ),
            // Busy connections are never chosen, however long their wait was stamped.
            (&[(1, 10, 1), (2, 600, 0)], 1000, 100, Some((2, 600))),
            // Not waiting at all.
            (&[(1, 0, 0)], 1000, 100, None),
            // Too recent: a good client that just connected.
            (&[(1, 950, 0)], 1000, 100, None),
            (&[(1, 900, 0)], 1000, 100, Some((1, 900))),
            // Ties go to the older connection.
            (&[(7, 500, 0), (3, 500, 0)], 1000, 100, Some((3, 500))),
        ];
        for (rows, now, min, expected) in table {
            assert_eq!(
                longest_stalled(rows.iter().copied(), now, min),
                expected,
                "{rows:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_full_listener_evicts_the_stalled_and_keeps_the_busy() {
        let slots = Slots::new(2, Duration::from_millis(50));
        let a = slots.admit().await;
        let b = slots.admit().await;
        assert!(a.evicted.is_none() && b.evicted.is_none());
        // `a` has a request being worked on; `b` waits on its client.
        let working = a.slot.activity().busy();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let c = tokio::time::timeout(Duration::from_secs(2), slots.admit())
            .await
            .expect("room was made");
        assert!(c.evicted.is_some_and(|d| d >= Duration::from_millis(50)));
        tokio::time::timeout(Duration::from_secs(1), b.slot.evicted())
            .await
            .expect("the stalled connection was told to close");
        // Full again (`a` busy, `c` fresh): a new one waits until one frees or stalls.
        let waiting = tokio::time::timeout(Duration::from_millis(20), slots.admit()).await;
        assert!(
            waiting.is_err(),
            "admitted past the cap with nothing to evict"
        );
        drop(working);
        drop(a);
        let d = tokio::time::timeout(Duration::from_secs(1), slots.admit())
            .await
            .expect("a freed slot admits at once");
        assert!(d.evicted.is_none());
        drop(b);
        // The evicted slot's drop did not free the place it no longer had.
        assert_eq!(slots.shared.table.lock().unwrap().entries.len(), 2);
    }

    #[tokio::test]
    async fn the_clients_turn_inside_a_request_makes_it_evictable_again() {
        let slots = Slots::new(1, Duration::from_millis(30));
        let a = slots.admit().await;
        let activity = a.slot.activity();
        let busy = activity.busy();
        let turn = activity.client_turn();
        activity.would_block();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let b = tokio::time::timeout(Duration::from_secs(1), slots.admit())
            .await
            .expect("the connection waiting for a body was evicted");
        assert!(b.evicted.is_some());
        drop(turn);
        drop(busy);
        assert_eq!(activity.entry.busy.load(Ordering::Acquire), 0);
    }
}
