//! Reloading files that change while the server runs: policies, schema, entities, trust
//! material and key files (through the engine's reload), and the revocation list. A
//! watched file is re-read after its directory reports a change (debounced); a valid new
//! version is swapped in whole, an invalid one is logged and counted, and the last good
//! version keeps serving.

use crate::identity::revocation::RevocationList;
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use std::collections::HashSet;
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
    watch(&[path.to_path_buf()], &[], reload)
}

fn canonical(dir: &Path) -> Result<PathBuf, String> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    dir.canonicalize()
        .map_err(|e| format!("{}: cannot watch: {e}", dir.display()))
}

/// Calls `reload` once per burst of changes to any of `files` or to anything directly in
/// one of `dirs`. Other changes in the same directories (a log file, say) are ignored;
/// names starting with `..` count, for Kubernetes ConfigMap updates.
pub fn watch(
    files: &[PathBuf],
    dirs: &[PathBuf],
    reload: impl Fn() + Send + 'static,
) -> Result<WatchGuard, String> {
    let mut file_keys = HashSet::new();
    let mut dir_keys = HashSet::new();
    for f in files {
        let parent = canonical(f.parent().unwrap_or(Path::new(".")))?;
        if let Some(name) = f.file_name() {
            file_keys.insert((parent, name.to_os_string()));
        }
    }
    for d in dirs {
        dir_keys.insert(canonical(d)?);
    }
    let mut watched: Vec<PathBuf> = file_keys
        .iter()
        .map(|(p, _)| p.clone())
        .chain(dir_keys.iter().cloned())
        .collect();
    watched.sort();
    watched.dedup();
    let names: HashSet<_> = file_keys.iter().map(|(_, n)| n.clone()).collect();
    let interesting = move |p: &Path| {
        let name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        if name.to_string_lossy().starts_with("..") {
            return true;
        }
        // Events name the (canonical) directories watched, so the path as reported decides
        // for anything but a watched file's name: a file that shares a watched directory
        // (an audit log written on every decision, say) costs no path resolution per write.
        let parent = p.parent().unwrap_or(Path::new(""));
        if !names.contains(&name) {
            return dir_keys.contains(parent);
        }
        let hit = |d: &Path| dir_keys.contains(d) || file_keys.contains(&(d.into(), name.clone()));
        hit(parent) || parent.canonicalize().is_ok_and(|d| hit(&d))
    };
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening or reading a watched file (the reload itself does) is not a change;
        // a close after writing is.
        let changed = |kind: &notify::EventKind| match kind {
            notify::EventKind::Access(access) => matches!(
                access,
                notify::event::AccessKind::Close(notify::event::AccessMode::Write)
            ),
            _ => true,
        };
        if let Ok(event) = event
            && changed(&event.kind)
            && event.paths.iter().any(|p| interesting(p))
        {
            let _ = tx.send(());
        }
    })
    .map_err(|e| format!("cannot watch files: {e}"))?;
    for dir in &watched {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    fn wait_for(reloads: &AtomicUsize, at_least: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if reloads.load(Ordering::SeqCst) >= at_least {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Writes to a file that only shares a watched directory (an audit log) reload
    /// nothing; a watched file and anything in a watched directory do.
    #[test]
    fn only_watched_files_and_directories_reload() {
        let dir = tempfile::tempdir().expect("temp dir");
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).expect("policies dir");
        let watched = dir.path().join("ca.pem");
        std::fs::write(&watched, "one").expect("write");
        let reloads = Arc::new(AtomicUsize::new(0));
        let counter = reloads.clone();
        let _guard = watch(
            std::slice::from_ref(&watched),
            std::slice::from_ref(&policies),
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
        )
        .expect("watch");

        for n in 0..20 {
            std::fs::write(dir.path().join("audit.log"), format!("line {n}\n")).expect("write");
        }
        std::thread::sleep(DEBOUNCE * 4);
        assert_eq!(
            reloads.load(Ordering::SeqCst),
            0,
            "a neighbour's writes reloaded"
        );

        std::fs::write(&watched, "two").expect("write");
        assert!(
            wait_for(&reloads, 1),
            "a change to the watched file was missed"
        );
        std::fs::write(
            policies.join("new.cedar"),
            "permit (principal, action, resource);",
        )
        .expect("write");
        assert!(
            wait_for(&reloads, 2),
            "a new file in the watched directory was missed"
        );
    }
}
