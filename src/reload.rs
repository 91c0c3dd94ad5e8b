//! Reloading files that change while the server runs: policies, schema, entities, trust
//! material and key files (through the engine's reload), and the revocation list. A
//! watched file is re-read once its directory has been quiet for a moment after a change;
//! a valid new version is swapped in whole, an invalid or unreadable one is logged, counted
//! and reported (`/readyz`), and the last good version keeps serving.

use crate::identity::revocation::RevocationList;
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Quiet time after a change before the files are read: editors and scripts write in
/// several steps, and a file is not read while writes to it keep coming.
const QUIET: Duration = Duration::from_millis(200);

/// The longest a reload waits for quiet: a file written without pause is read anyway
/// after this, and its own checks decide (a revocation list must end with a newline).
const MAX_QUIET_WAIT: Duration = Duration::from_secs(5);

/// In a watched directory, only files with this extension are read by a reload (the
/// policy directory's `*.cedar`); a log or editor file beside them reloads nothing.
const DIR_FILE_EXTENSION: &str = "cedar";

/// The problem of the last failed reload of one file, until a reload of it succeeds; the
/// engine shows it in `/readyz` beside its own.
pub type ReloadProblem = Arc<Mutex<Option<String>>>;

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
/// symlink swaps are seen (also when the file's directory is itself a symlink into the
/// volume's timestamped directory; see [`watch`]).
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

/// Calls `reload` once per burst of changes to any of `files` or to a `*.cedar` file
/// directly in one of `dirs`. Other changes in the same directories (a log file, say) are
/// ignored, so a log written beside the watched files cannot feed reloads that log; names
/// starting with `..` count, for Kubernetes ConfigMap updates.
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
    // A directory reached through a symlink (a ConfigMap key projected to `certs/ca.pem`:
    // `certs -> ..data/certs`) canonicalises into the kubelet's timestamped directory,
    // which the next update deletes, and the watch with it. The directory holding the
    // symlink is watched too, so the `..data` swap there is seen on every update.
    for d in files
        .iter()
        .filter_map(|f| f.parent())
        .chain(dirs.iter().map(PathBuf::as_path))
    {
        for link in d.ancestors().filter(|a| a.is_symlink()) {
            watched.push(canonical(link.parent().unwrap_or(Path::new(".")))?);
        }
    }
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
            return Path::new(&name)
                .extension()
                .is_some_and(|e| e == DIR_FILE_EXTENSION)
                && dir_keys.contains(parent);
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
                let burst = Instant::now();
                while burst.elapsed() < MAX_QUIET_WAIT {
                    match rx.recv_timeout(QUIET) {
                        Ok(()) => continue,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                reload();
            }
        })
        .map_err(|e| format!("cannot start the reload thread: {e}"))?;
    Ok(WatchGuard { _watcher: watcher })
}

/// Watches the revocation list and swaps each valid new version into `cell`. A list that
/// cannot be read or parsed, or looks half-written ([`RevocationList::load`]), is logged,
/// counted and left in `problem` (for `/readyz`); the last good list keeps serving.
pub fn watch_revocations(
    path: PathBuf,
    cell: Arc<ArcSwap<RevocationList>>,
    metrics: Arc<Metrics>,
    problem: ReloadProblem,
) -> Result<WatchGuard, String> {
    let watched = path.clone();
    watch_file(&watched, move || {
        let serving = cell.load_full();
        let report = |p: Option<String>| {
            if let Ok(mut slot) = problem.lock() {
                *slot = p;
            }
        };
        match RevocationList::load(&path, Some(&serving)) {
            Ok(list) if list == *serving => report(None),
            Ok(list) => {
                tracing::info!(file = %path.display(), entries = list.len(), was = serving.len(), "revocation list reloaded");
                metrics.revocation_reload(Some(list.len()));
                cell.store(Arc::new(list));
                report(None);
            }
            Err(problems) => {
                let message = format!(
                    "revocation list not reloaded, the last good one ({} entries) keeps serving: {}",
                    serving.len(),
                    problems.join("; ")
                );
                tracing::error!("{message}");
                metrics.revocation_reload(None);
                report(Some(message));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
            // A log beside the policies is not a policy either.
            std::fs::write(policies.join("portcullis.log"), format!("line {n}\n")).expect("write");
        }
        std::thread::sleep(QUIET * 4);
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
