//! In-flight transfers: one per file version being downloaded, however many ask for it (the
//! daemon's `SHOAL_WANT`, `get`, readers of the HTTP API). A [`Transfer`] tells its readers
//! when each chunk is held and how the download ended, carries their reading positions to the
//! download engine as a priority hint, and measures its rate. [`Peer::want`] is the one way in.

use super::download::{self, locate, DownloadError};
use super::meter::Meter;
use super::origin::Failure;
use super::store::StoredFile;
use super::tracker_client::TrackerError;
use super::Peer;
use crate::protocol::{validate_name, FileInfo, Hash, LocationsReply};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;
use tracing::Instrument;

/// How a transfer ended: the final path, or why it failed (shared by everyone who waited).
pub type Outcome = Result<PathBuf, Arc<DownloadError>>;

/// Chunks ahead of a reader's position that the engine fetches before any other.
pub const READ_AHEAD_CHUNKS: u32 = 32;

/// Why [`Peer::want`] cannot give a file.
#[derive(Debug, thiserror::Error)]
pub enum WantError {
    /// No peer shares that name (or that version), and this node does not hold it.
    #[error("{0}")]
    NotFound(String),
    /// The name can never be a file: not a safe relative path.
    #[error("{0}")]
    BadName(String),
    /// The tracker could not be asked, and the file is not held here.
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error("{0}")]
    Other(String),
}

/// The transfers in flight, by file version. Held briefly, never across an `.await`.
#[derive(Default)]
pub struct Transfers {
    running: Mutex<HashMap<(String, Hash), Arc<Transfer>>>,
    /// Numbers transfers in the order they were opened.
    opened: AtomicU64,
}

/// What [`Transfers::open`] found.
pub enum Opened {
    /// A new transfer: the caller runs the download and ends it with [`Transfers::close`].
    Started(Arc<Transfer>),
    /// Someone is already downloading this version.
    Joined(Arc<Transfer>),
}

impl Transfers {
    fn map(&self) -> MutexGuard<'_, HashMap<(String, Hash), Arc<Transfer>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the transfer of this version, or registers a new one.
    pub fn open(&self, info: &FileInfo) -> Opened {
        let key = (info.name.clone(), info.digest);
        let mut map = self.map();
        if let Some(t) = map.get(&key) {
            return Opened::Joined(t.clone());
        }
        let mut t = Transfer::new(info.clone(), None);
        t.order = self.opened.fetch_add(1, Ordering::Relaxed);
        let t = Arc::new(t);
        map.insert(key, t.clone());
        Opened::Started(t)
    }

    /// The transfers of other versions of the same name opened before `transfer`. A name has
    /// one partial file, so its versions are downloaded one after the other, in this order.
    pub fn before(&self, transfer: &Transfer) -> Vec<Arc<Transfer>> {
        let mut earlier: Vec<Arc<Transfer>> = self
            .map()
            .values()
            .filter(|t| t.info.name == transfer.info.name && t.order < transfer.order)
            .cloned()
            .collect();
        earlier.sort_by_key(|t| t.order);
        earlier
    }

    /// Ends a transfer: its readers learn the outcome, and the next request starts afresh.
    pub fn close(&self, transfer: &Arc<Transfer>, outcome: Outcome) {
        let key = (transfer.info.name.clone(), transfer.info.digest);
        let mut map = self.map();
        if map.get(&key).is_some_and(|t| Arc::ptr_eq(t, transfer)) {
            map.remove(&key);
        }
        drop(map);
        transfer.news.send_replace(Some(outcome));
    }

    /// The transfers in flight now.
    pub fn all(&self) -> Vec<Arc<Transfer>> {
        self.map().values().cloned().collect()
    }
}

/// One file version on its way to this node (or already here: see [`Transfer::held`]).
pub struct Transfer {
    /// Name, size, chunk size and digest.
    pub info: FileInfo,
    /// When it was opened, relative to the others (see [`Transfers::before`]).
    order: u64,
    /// The partial (later final) file the chunks land in; `None` until the download opened it.
    /// Held briefly.
    file: Mutex<Option<Arc<StoredFile>>>,
    /// Changes whenever a chunk lands or the file is opened (the value stays `None`), and once
    /// when the transfer ends (the outcome).
    news: watch::Sender<Option<Outcome>>,
    /// Each reader's next chunk and its last, by reader id. Held briefly.
    readers: Mutex<HashMap<u64, (u32, u32)>>,
    next_reader: AtomicU64,
    /// Holders a worker is fetching from now. Held briefly.
    sources: Mutex<BTreeSet<String>>,
    /// Bytes landed, for the recent download rate.
    pub down: Meter,
}

impl Transfer {
    fn new(info: FileInfo, outcome: Option<Outcome>) -> Transfer {
        Transfer {
            info,
            order: 0,
            file: Mutex::new(None),
            news: watch::Sender::new(outcome),
            readers: Mutex::new(HashMap::new()),
            next_reader: AtomicU64::new(0),
            sources: Mutex::new(BTreeSet::new()),
            down: Meter::default(),
        }
    }

    /// A file held here in full: a transfer that has already ended well.
    pub fn held(file: Arc<StoredFile>) -> Arc<Transfer> {
        let t = Transfer::new(file.info.clone(), Some(Ok(file.path())));
        *t.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
        Arc::new(t)
    }

    pub fn chunk_size(&self) -> u32 {
        self.info.chunk_size
    }

    pub fn file(&self) -> Option<Arc<StoredFile>> {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The engine opened (or reopened) the file the chunks land in.
    pub fn opened(&self, file: Arc<StoredFile>) {
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
        self.news.send_modify(|_| {});
    }

    /// The engine holds one more chunk (`bytes` long) now.
    pub fn landed(&self, bytes: u64) {
        self.down.add(bytes);
        self.news.send_modify(|_| {});
    }

    /// Chunks became held without a transfer (copied from files held here).
    pub fn filled(&self) {
        self.news.send_modify(|_| {});
    }

    /// The outcome, once the transfer has ended.
    pub fn outcome(&self) -> Option<Outcome> {
        self.news.borrow().clone()
    }

    /// Waits for the end of the transfer.
    pub async fn finished(&self) -> Outcome {
        let mut rx = self.news.subscribe();
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("waited for it"),
            Err(_) => unreachable!("the sender lives in self"),
        };
        outcome
    }

    /// Waits until chunk `index` is held (verified and written) and returns the file to read it
    /// from; fails when the transfer ended without it.
    pub async fn chunk(&self, index: u32) -> Result<Arc<StoredFile>, Arc<DownloadError>> {
        let mut rx = self.news.subscribe();
        loop {
            // Marked seen before looking, so a chunk that lands after the look wakes us.
            let outcome = rx.borrow_and_update().clone();
            if let Some(f) = self.file().filter(|f| f.has_chunk(index)) {
                return Ok(f);
            }
            match outcome {
                Some(Err(e)) => return Err(e),
                Some(Ok(_)) => {
                    let why = anyhow::anyhow!("chunk {index} is no longer held here");
                    return Err(Arc::new(DownloadError::Local(why)));
                }
                None => {}
            }
            if rx.changed().await.is_err() {
                unreachable!("the sender lives in self");
            }
        }
    }

    /// Registers a reader that wants chunks `first..=last`, in order; it asks the engine for
    /// the chunks ahead of its position first. Dropping the handle unregisters it.
    pub fn reader(self: &Arc<Self>, first: u32, last: u32) -> Reader {
        let id = self.next_reader.fetch_add(1, Ordering::Relaxed);
        self.lock_readers().insert(id, (first, last));
        Reader {
            transfer: self.clone(),
            id,
        }
    }

    fn lock_readers(&self) -> MutexGuard<'_, HashMap<u64, (u32, u32)>> {
        self.readers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reader_count(&self) -> usize {
        self.lock_readers().len()
    }

    /// The chunks readers wait for next, most urgent first: from each reader's position, up to
    /// [`READ_AHEAD_CHUNKS`] ahead, nearest reader first.
    pub fn urgent(&self) -> Vec<u32> {
        let readers = self.lock_readers();
        if readers.is_empty() {
            return Vec::new();
        }
        let mut spans: Vec<(u32, u32)> = readers.values().copied().collect();
        drop(readers);
        spans.sort_unstable();
        let mut out = Vec::new();
        for (next, last) in spans {
            let end = last.min(next.saturating_add(READ_AHEAD_CHUNKS - 1));
            for i in next..=end {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out
    }

    /// A worker began fetching from `addr`.
    pub fn source_started(&self, addr: &str) {
        self.lock_sources().insert(addr.to_string());
    }

    /// The worker fetching from `addr` ended.
    pub fn source_ended(&self, addr: &str) {
        self.lock_sources().remove(addr);
    }

    pub fn sources(&self) -> Vec<String> {
        self.lock_sources().iter().cloned().collect()
    }

    fn lock_sources(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A reader of a [`Transfer`]; moves its position forward with [`Reader::at`].
pub struct Reader {
    transfer: Arc<Transfer>,
    id: u64,
}

impl Reader {
    /// The reader now waits for chunk `index`.
    pub fn at(&self, index: u32) {
        if let Some(span) = self.transfer.lock_readers().get_mut(&self.id) {
            span.0 = index;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.transfer.lock_readers().remove(&self.id);
    }
}

/// Where a wanted file comes from.
pub enum Resolved {
    /// Held here in full under its final name.
    Held(Arc<StoredFile>),
    /// To be fetched (or being fetched) from the swarm: the tracker's view, without hashes.
    Swarm(LocationsReply),
}

/// Why a pull from the origin gave no version: a name the origin lacks too is not found.
fn pull_failure(e: DownloadError) -> WantError {
    match e {
        DownloadError::Origin(o) if o.failure == Failure::NotFound => {
            WantError::NotFound(o.to_string())
        }
        DownloadError::Tracker(e) => WantError::Tracker(e),
        e => WantError::Other(e.to_string()),
    }
}

impl Peer {
    /// Finds what `name` (version `digest`, or the newest) is, without starting anything: the
    /// file held here, or the tracker's view of it. A file held here is served even while the
    /// tracker is away; without a digest, the newest version the swarm offers wins.
    pub async fn resolve(&self, name: &str, digest: Option<Hash>) -> Result<Resolved, WantError> {
        validate_name(name).map_err(|r| WantError::BadName(r.message))?;
        let held = |d: Option<&Hash>| self.store.find(name, d).filter(|f| f.is_final());
        if let Some(f) = digest.and_then(|d| held(Some(&d))) {
            return Ok(Resolved::Held(f));
        }
        let not_found = || match digest {
            Some(d) => format!("no peer shares version {} of {name:?}", d.to_hex()),
            None => format!("no peer shares {name:?}"),
        };
        match locate(self, name, digest, false).await {
            Ok(loc) => {
                if loc.file.name != name || digest.is_some_and(|d| d != loc.file.digest) {
                    return Err(WantError::Other(format!(
                        "the tracker answered with {:?} (digest {}) to a request for {name:?}",
                        loc.file.name,
                        loc.file.digest.to_hex()
                    )));
                }
                match held(Some(&loc.file.digest)) {
                    Some(f) => Ok(Resolved::Held(f)),
                    None => Ok(Resolved::Swarm(loc)),
                }
            }
            Err(DownloadError::NoSuchFile(_)) => match held(None).filter(|_| digest.is_none()) {
                Some(f) => Ok(Resolved::Held(f)),
                None => Err(WantError::NotFound(not_found())),
            },
            Err(DownloadError::Tracker(e)) => match held(None).filter(|_| digest.is_none()) {
                Some(f) => Ok(Resolved::Held(f)),
                None => Err(WantError::Tracker(e)),
            },
            Err(e) => Err(WantError::Other(e.to_string())),
        }
    }

    /// Gives the transfer of `name` (version `digest`, or the newest): the file held here, the
    /// download already running, or a download started now in the background.
    pub async fn want(
        self: &Arc<Self>,
        name: &str,
        digest: Option<Hash>,
    ) -> Result<Arc<Transfer>, WantError> {
        match self.resolve(name, digest).await {
            Ok(Resolved::Held(f)) => Ok(Transfer::held(f)),
            Ok(Resolved::Swarm(loc)) => self.fetch(loc).await,
            // A name no peer shares comes from the origin, if there is one: once the pulling
            // peers know every chunk hash, it is an ordinary version, fetched like any other.
            Err(WantError::NotFound(_)) if digest.is_none() && self.origin.is_some() => {
                let loc = download::locate_or_pull(self, name, None)
                    .await
                    .map_err(pull_failure)?;
                self.fetch(loc).await
            }
            Err(e) => Err(e),
        }
    }

    /// Joins the download of the version `loc` names, or starts it in the background.
    async fn fetch(self: &Arc<Self>, loc: LocationsReply) -> Result<Arc<Transfer>, WantError> {
        let key = (loc.file.name.clone(), loc.file.digest);
        if let Some(t) = self.transfers.map().get(&key) {
            return Ok(t.clone());
        }
        // A new download needs the hash list, which a first look leaves out.
        let (name, digest) = key;
        let loc = match loc.hashes {
            Some(_) => loc,
            None => match locate(self, &name, Some(digest), true).await {
                Ok(loc) => loc,
                Err(DownloadError::NoSuchFile(_)) => {
                    return Err(WantError::NotFound(format!(
                        "no peer shares {name:?} any more"
                    )))
                }
                Err(DownloadError::Tracker(e)) => return Err(WantError::Tracker(e)),
                Err(e) => return Err(WantError::Other(e.to_string())),
            },
        };
        match self.transfers.open(&loc.file) {
            Opened::Joined(t) => Ok(t),
            Opened::Started(t) => {
                let (peer, started) = (self.clone(), t.clone());
                let span = tracing::info_span!("download", file = %name);
                let run = async move {
                    let progress = Arc::new(download::Silent);
                    match download::drive(&peer, &loc, &started, progress).await {
                        Ok(_) | Err(DownloadError::Stopped(_)) => {}
                        Err(e) => tracing::warn!(error = %e, "download failed"),
                    }
                };
                self.tasks.spawn(run.instrument(span));
                Ok(t)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info() -> FileInfo {
        FileInfo {
            name: "f".into(),
            size: 1000,
            chunk_size: 10,
            digest: Hash([7; 32]),
        }
    }

    #[test]
    fn readers_ask_for_the_chunks_ahead_of_them_nearest_first() {
        let t = Arc::new(Transfer::new(info(), None));
        assert!(t.urgent().is_empty());
        let far = t.reader(50, 99);
        let near = t.reader(3, 5);
        assert_eq!(&t.urgent()[..4], &[3, 4, 5, 50]);
        assert_eq!(t.urgent().len(), 3 + READ_AHEAD_CHUNKS as usize);
        near.at(5);
        assert_eq!(&t.urgent()[..2], &[5, 50]);
        drop(near);
        drop(far);
        assert_eq!(t.reader_count(), 0);
    }

    #[test]
    fn one_transfer_per_version_until_it_is_closed() {
        let transfers = Transfers::default();
        let Opened::Started(first) = transfers.open(&info()) else {
            panic!("nothing was running")
        };
        let Opened::Joined(second) = transfers.open(&info()) else {
            panic!("the first is running")
        };
        assert!(Arc::ptr_eq(&first, &second));
        let other = FileInfo {
            digest: Hash([8; 32]),
            ..info()
        };
        let Opened::Started(later) = transfers.open(&other) else {
            panic!("another version")
        };
        assert!(transfers.before(&first).is_empty());
        assert!(Arc::ptr_eq(&transfers.before(&later)[0], &first));
        transfers.close(&first, Ok(PathBuf::from("f")));
        assert!(second.outcome().is_some_and(|o| o.is_ok()));
        assert!(transfers.before(&later).is_empty());
        assert!(matches!(transfers.open(&info()), Opened::Started(_)));
    }

    #[tokio::test]
    async fn a_reader_learns_that_the_transfer_failed() {
        let transfers = Transfers::default();
        let Opened::Started(t) = transfers.open(&info()) else {
            panic!("nothing was running")
        };
        let waiting = tokio::spawn({
            let t = t.clone();
            async move { t.chunk(0).await.map(|_| ()) }
        });
        let failed = Arc::new(DownloadError::Stopped("f".into()));
        transfers.close(&t, Err(failed));
        let result = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(result, Ok(Ok(Err(_)))));
    }
}
