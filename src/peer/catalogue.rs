//! The catalogue: keeps what a daemon peer offers in step with its data dir while it runs.
//! Changes are noticed through inotify (the `notify` crate) and, as a safety net, by a full
//! rescan every [`RESCAN_EVERY`]. A held version whose file was deleted, replaced or changed is
//! withdrawn first; then every file not yet shared is hashed and published (a new version when
//! its name is already held) once it is complete: its size and mtime unchanged for the settle
//! time (`SHOAL_SETTLE_TIME`).

use super::store::{Found, Stamp, Store, StoredFile};
use super::Peer;
use crate::protocol::Hash;
use notify::Watcher;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A full rescan at least this often, in case inotify missed something (queue overflow, a
/// file system without it, the watch limit reached).
const RESCAN_EVERY: Duration = Duration::from_secs(10);
/// Scans woken by file events are at least this far apart, so a file being written (an event
/// per write) costs a few scans, not one per write.
const MIN_SCAN_GAP: Duration = Duration::from_millis(100);

/// A file on disk that no held version matches: a candidate to hash and publish.
struct Candidate {
    name: String,
    path: PathBuf,
    stamp: Stamp,
}

/// Follows the data dir until the peer stops.
pub async fn watch(peer: Arc<Peer>) {
    let (tx, mut events) = mpsc::channel(1);
    let watcher = start_watcher(peer.store.dir(), tx);
    let fallback = if watcher.is_some() {
        RESCAN_EVERY
    } else {
        peer.cfg.settle_time.max(MIN_SCAN_GAP)
    };
    let mut settling = Settling::default();
    loop {
        let scanned = Instant::now();
        let next = reconcile(&peer, &mut settling).await;
        let wake = next.unwrap_or(scanned + fallback).min(scanned + fallback);
        tokio::select! {
            _ = peer.stop.cancelled() => return,
            _ = events.recv() => {}
            _ = peer.rescan.notified() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
        tokio::select! {
            _ = peer.stop.cancelled() => return,
            _ = tokio::time::sleep_until(scanned + MIN_SCAN_GAP) => {}
        }
    }
}

/// Watches `dir` recursively; every change to a visible path sends a wake-up (coalesced: the
/// channel holds one). `None`, after a warning, where inotify is unavailable.
fn start_watcher(dir: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    // notify reports the paths of a relative watch joined to the working directory, so a
    // relative data dir (the default is `.`) must be joined the same way, or no event would
    // ever look like one of ours.
    let root = std::env::current_dir().map_or_else(|_| dir.to_path_buf(), |cwd| cwd.join(dir));
    let handler = move |event: notify::Result<notify::Event>| {
        // A download writes its hidden partial files constantly; only visible paths matter.
        let relevant = match event {
            Ok(e) => e.paths.iter().any(|p| visible(&root, p)),
            Err(_) => true,
        };
        if relevant {
            let _ = tx.try_send(());
        }
    };
    let watching = notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::Recursive)?;
        Ok(w)
    });
    match watching {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the data dir; rescanning it every SHOAL_SETTLE_TIME instead");
            None
        }
    }
}

/// Whether `path` (under `root`) has no hidden component.
fn visible(root: &Path, path: &Path) -> bool {
    path.strip_prefix(root).is_ok_and(|rel| {
        rel.components()
            .all(|c| !c.as_os_str().to_string_lossy().starts_with('.'))
    })
}

/// One pass: withdraw what is gone or changed, publish what is new and settled. Returns when
/// a file still settling should be looked at again.
async fn reconcile(peer: &Arc<Peer>, settling: &mut Settling) -> Option<Instant> {
    let survey = {
        let peer = peer.clone();
        tokio::task::spawn_blocking(move || survey(&peer.store)).await
    };
    let Ok((candidates, gone)) = survey else {
        return None;
    };
    // What a replacement with an older mtime would fail to supersede: such a file is settled
    // at once, so it is published in this same pass and can be compared.
    let mut replaced: HashMap<String, (u64, Hash)> = HashMap::new();
    for f in gone {
        let newest = replaced
            .entry(f.info.name.clone())
            .or_insert(f.version_key());
        *newest = (*newest).max(f.version_key());
        peer.withdraw(&f).await;
    }
    let now = Instant::now();
    settling.forget_all_but(&candidates);
    let mut ready = Vec::new();
    let mut next: Option<Instant> = None;
    for c in candidates {
        match settling.ready(&c, now, peer.cfg.settle_time) {
            Ok(()) => ready.push(c),
            Err(at) => next = Some(next.map_or(at, |n| n.min(at))),
        }
    }
    if ready.is_empty() {
        return next;
    }
    let published = {
        let peer = peer.clone();
        tokio::task::spawn_blocking(move || publish(&peer, ready, &replaced))
            .await
            .unwrap_or(0)
    };
    if published > 0 {
        peer.metrics.versions_published.inc_by(published);
        peer.update_file_gauges();
        if let Err(e) = peer.sync().await {
            tracing::warn!(error = %e, "new files are not registered yet; will retry");
        }
    }
    next
}

/// What is on disk that no held version matches, and the held versions whose file was
/// deleted, replaced or changed (blocking).
fn survey(store: &Store) -> (Vec<Candidate>, Vec<Arc<StoredFile>>) {
    let (found, failures) = store.walk();
    for (path, e) in failures {
        tracing::debug!(path, error = format!("{e:#}"), "not shared");
    }
    let files: Vec<Candidate> = found
        .into_iter()
        .filter_map(|f| match f {
            Found::File { name, path, stamp } => Some(Candidate { name, path, stamp }),
            Found::Partial(_) => None,
        })
        .collect();
    let on_disk: HashMap<&Path, Stamp> =
        files.iter().map(|c| (c.path.as_path(), c.stamp)).collect();
    let mut gone = Vec::new();
    let mut matched = Vec::new();
    for f in store.all() {
        let Some((path, stamp)) = f.on_disk() else {
            continue;
        };
        if !path.starts_with(store.dir()) {
            continue;
        }
        if !f.is_changed() && on_disk.get(path.as_path()) == Some(&stamp) {
            matched.push(path);
        } else {
            gone.push(f);
        }
    }
    let candidates = files
        .into_iter()
        .filter(|c| !matched.contains(&c.path))
        .collect();
    (candidates, gone)
}

/// Hashes and shares each candidate; returns how many were published (blocking). `replaced`:
/// the newest version key withdrawn for a name in this pass.
fn publish(peer: &Peer, ready: Vec<Candidate>, replaced: &HashMap<String, (u64, Hash)>) -> u64 {
    let mut published = 0;
    for c in ready {
        match peer.store.share_as(&c.path, &c.name, peer.cfg.chunk_size) {
            Ok(f) => {
                tracing::info!(file = %c.name, digest = %f.info.digest.to_hex(), published = f.published, size = f.info.size, "publishing");
                published += 1;
                if replaced
                    .get(&c.name)
                    .is_some_and(|old| *old > f.version_key())
                {
                    tracing::warn!(file = %c.name, "the replacement has an older mtime than the version it replaced, so peers still holding that one keep it as the newest; `touch` the file to publish it as the newest");
                }
            }
            Err(e) => tracing::warn!(file = %c.name, error = format!("{e:#}"), "not shared"),
        }
    }
    published
}

/// When each candidate was first seen with its current stamp.
#[derive(Default)]
struct Settling {
    seen: HashMap<PathBuf, (Stamp, Instant)>,
}

impl Settling {
    /// A file is complete once nothing has changed it for `settle`: its mtime is that old (a
    /// file renamed into the dir after being written elsewhere), or its stamp has stayed the
    /// same that long (also with an mtime in the future). Otherwise: when to look again.
    fn ready(&mut self, c: &Candidate, now: Instant, settle: Duration) -> Result<(), Instant> {
        let since = match self.seen.get(&c.path) {
            Some((stamp, t)) if *stamp == c.stamp => *t,
            _ => {
                self.seen.insert(c.path.clone(), (c.stamp, now));
                now
            }
        };
        let quiet = c.stamp.age(SystemTime::now()).max(now - since);
        if quiet >= settle {
            self.seen.remove(&c.path);
            Ok(())
        } else {
            Err(now + (settle - quiet))
        }
    }

    fn forget_all_but(&mut self, candidates: &[Candidate]) {
        self.seen
            .retain(|path, _| candidates.iter().any(|c| &c.path == path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(dir: &Path, name: &str) -> Candidate {
        let path = dir.join(name);
        std::fs::write(&path, b"data").unwrap();
        let stamp = Stamp::read(&path).unwrap();
        Candidate {
            name: name.into(),
            path,
            stamp,
        }
    }

    const SETTLE: Duration = Duration::from_secs(60);

    /// A directory for candidates, an empty record of them, and the time they are seen.
    fn fixture() -> (tempfile::TempDir, Settling, Instant) {
        (
            tempfile::tempdir().unwrap(),
            Settling::default(),
            Instant::now(),
        )
    }

    #[test]
    fn a_file_is_ready_once_still_for_the_settle_time() {
        let (dir, mut settling, now) = fixture();
        let settle = SETTLE;
        let fresh = candidate(dir.path(), "fresh.bin");
        let at = settling.ready(&fresh, now, settle).unwrap_err();
        assert!(at > now && at <= now + settle);
        // Seen with the same stamp for the settle time: ready, whatever its mtime says.
        assert!(settling.ready(&fresh, now + settle, settle).is_ok());

        // Renamed in after being written long ago: ready at once.
        let old = candidate(dir.path(), "old.bin");
        let long_ago = SystemTime::now() - 2 * settle;
        std::fs::File::options()
            .write(true)
            .open(&old.path)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        let old = Candidate {
            stamp: Stamp::read(&old.path).unwrap(),
            ..old
        };
        assert!(settling.ready(&old, now, settle).is_ok());
    }

    #[test]
    fn a_file_written_again_starts_settling_again() {
        let (dir, mut settling, now) = fixture();
        let settle = SETTLE;
        let first = candidate(dir.path(), "a.bin");
        assert!(settling.ready(&first, now, settle).is_err());
        std::fs::write(&first.path, b"more data").unwrap();
        let again = candidate(dir.path(), "a.bin");
        assert!(settling.ready(&again, now + settle, settle).is_err());
        settling.forget_all_but(&[]);
        assert!(settling.seen.is_empty());
    }

    #[test]
    fn only_visible_paths_wake_the_catalogue() {
        let root = Path::new("/data");
        assert!(visible(root, Path::new("/data/models/a.bin")));
        assert!(!visible(root, Path::new("/data/models/.a.bin.shoal-part")));
        assert!(!visible(root, Path::new("/data/.cache/a.bin")));
        assert!(!visible(root, Path::new("/elsewhere/a.bin")));
    }

    #[tokio::test]
    async fn a_relative_data_dir_wakes_the_catalogue_too() {
        // Not `tempdir()`: its name is hidden, and files under hidden paths wake nothing.
        let dir = tempfile::Builder::new().prefix("data").tempdir().unwrap();
        let cwd = std::env::current_dir().unwrap();
        let up: PathBuf = cwd.components().skip(1).map(|_| "..").collect();
        let relative = up.join(dir.path().strip_prefix("/").unwrap());
        let (tx, mut wakes) = mpsc::channel(1);
        let _watcher = start_watcher(&relative, tx).expect("inotify is available");
        std::fs::write(dir.path().join("new.bin"), b"data").unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(10), wakes.recv()).await;
        assert!(
            woke.is_ok(),
            "a new file in {} woke nothing",
            relative.display()
        );
    }
}
