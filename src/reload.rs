//! Reloading files that change while the server runs: policies, schema, entities, trust
//! material and key files (through the engine's reload), and the revocation list. A
//! watched file is re-read after its directory reports a change (debounced); a valid new
//! version is swapped in whole, an invalid one is logged and counted, and the last good
//! version keeps serving.

use crate::identity::revocation::RevocationList;
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Quiet time after a change before the file is read: editors write in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Keeps a file watch alive; dropping it stops the watch.
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for WatchGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WatchGuard")
    }
}

/// Calls `reload` (on a thread of its own) each time `path` may have changed. The
/// directory is watched, not the file, so atomic renames and Kubernetes ConfigMap
/// symlink swaps are seen.
pub fn watch_file(path: &Path, reload: impl Fn() + Send + 'static) -> Result<WatchGuard, String> {
    watch_files(&[path.to_path_buf()], reload)
}

/// Like [`watch_file`] for several files at once (their directories are watched, each
/// once); one debounced `reload` per burst of changes.
pub fn watch_files(
    paths: &[PathBuf],
    reload: impl Fn() + Send + 'static,
) -> Result<WatchGuard, String> {
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf()
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })
    .map_err(|e| format!("cannot watch files: {e}"))?;
    for dir in &dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| format!("{}: cannot watch: {e}", dir.display()))?;
    }
    std::thread::Builder::new()
        .name("portcullis-reload".into())
        .spawn(move || {
            // Ends when the watcher (and with it the sender) is dropped.
            while rx.recv().is_ok() {
                std::thread::sleep(DEBOUNCE);
                while rx.try_recv().is_ok() {}
                reload();
            }
        })
        .map_err(|e| format!("cannot start the reload thread: {e}"))?;
    Ok(WatchGuard { _watcher: watcher })
}

/// Watches the revocation list and swaps each valid new version into `cell`.
pub fn watch_revocations(
    path: PathBuf,
    cell: Arc<ArcSwap<RevocationList>>,
    metrics: Arc<Metrics>,
) -> Result<WatchGuard, String> {
    let watched = path.clone();
    watch_file(&watched, move || {
        let loaded = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|t| RevocationList::parse(&t));
        match loaded {
            Ok(list) if list == **cell.load() => {}
            Ok(list) => {
                tracing::info!(file = %path.display(), entries = list.len(), "revocation list reloaded");
                metrics.revocation_reload(Some(list.len()));
                cell.store(Arc::new(list));
            }
            Err(e) => {
                tracing::error!(file = %path.display(), "revocation list not reloaded, keeping the last good one: {e}");
                metrics.revocation_reload(None);
            }
        }
    })
}
