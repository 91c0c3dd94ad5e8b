//! Integration tests that must have the machine to themselves: a two-minute soak that
//! bounds the server's RSS growth and the time changes take to be seen, and SIGTERM under
//! load. Each was once a test binary with a single test, so it ran alone; here they take
//! [`alone`] so they still run one at a time, and no other test shares this binary.

#[path = "../common/mod.rs"]
mod common;

mod shutdown;
mod soak;

/// Held for the whole of a test that must not run beside another one of this binary.
/// (A tokio mutex: the guard is held across `.await`s, on each test's own runtime.)
pub async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ALONE.lock().await
}
