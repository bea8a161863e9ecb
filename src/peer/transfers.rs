//! In-flight transfers: one per file version being downloaded, however many ask for it (the
//! daemon's `SHOAL_WANT`, `get`, readers of the HTTP API), and one per name pulled from the
//! origin while its digest is not known, which goes on as the version's once it is. A
//! [`Transfer`] tells its readers when each chunk is held and how the download ended, carries
//! their reading positions to the download engine as a priority hint, and measures its rate.
//! [`Peer::want`] is the one way in.

use super::download::{self, locate, DownloadError};
use super::meter::Meter;
use super::origin::{Failure, PullPart};
use super::store::StoredFile;
use super::tracker_client::TrackerError;
use super::Peer;
use crate::protocol::{validate_name, FileInfo, Hash, LocationsReply};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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

/// A transfer's name and digest (`None` for a pull from the origin whose digest is not known).
type Key = (String, Option<Hash>);

/// The transfers in flight: by file version, and by name for a pull from the origin whose
/// digest is not known yet. Held briefly, never across an `.await`.
#[derive(Default)]
pub struct Transfers {
    running: Mutex<HashMap<Key, Arc<Transfer>>>,
    /// Numbers transfers in the order they were opened.
    opened: AtomicU64,
    /// Changes whenever a pull is opened (see [`Transfers::pulling`]).
    pulls: watch::Sender<()>,
}

/// What [`Transfers::open`] found.
pub enum Opened {
    /// A new transfer: the caller runs the download and ends it with [`Transfers::close`].
    Started(Arc<Transfer>),
    /// Someone is already downloading this version.
    Joined(Arc<Transfer>),
}

impl Transfers {
    fn map(&self) -> MutexGuard<'_, HashMap<Key, Arc<Transfer>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the transfer of this version, or registers a new one. The pull from the origin
    /// that found this version, if one is open, goes on as this transfer from now on.
    pub fn open(&self, info: &FileInfo) -> Opened {
        let key = (info.name.clone(), Some(info.digest));
        let mut map = self.map();
        let pull_key = (info.name.clone(), None);
        let pull = map
            .get(&pull_key)
            .filter(|p| p.digest() == Some(info.digest))
            .cloned();
        if pull.is_some() {
            map.remove(&pull_key);
        }
        let opened = match map.get(&key) {
            Some(t) => Opened::Joined(t.clone()),
            None => {
                let mut t = Transfer::new(info.clone(), None);
                t.order = self.opened.fetch_add(1, Ordering::Relaxed);
                let t = Arc::new(t);
                map.insert(key, t.clone());
                Opened::Started(t)
            }
        };
        drop(map);
        if let (Some(pull), Opened::Started(t) | Opened::Joined(t)) = (pull, &opened) {
            pull.continued_by(t);
        }
        opened
    }

    /// Registers the pull of `name` from the origin (one at a time per name: see
    /// [`Origin::turn`](super::origin::Origin::turn)); its size and chunk size come later.
    pub fn open_pull(&self, name: &str) -> Arc<Transfer> {
        let mut t = Transfer::empty(name.to_string());
        t.order = self.opened.fetch_add(1, Ordering::Relaxed);
        let t = Arc::new(t);
        self.map().insert((name.to_string(), None), t.clone());
        self.pulls.send_modify(|_| {});
        t
    }

    /// The pull of `name` from the origin running here, if one is.
    pub fn pulling(&self, name: &str) -> Option<Arc<Transfer>> {
        self.map().get(&(name.to_string(), None)).cloned()
    }

    /// Changes whenever a pull is opened.
    pub fn watch_pulls(&self) -> watch::Receiver<()> {
        self.pulls.subscribe()
    }

    /// The transfers of other versions of the same name opened before `transfer`. A name has
    /// one partial file, so its versions are downloaded one after the other, in this order.
    pub fn before(&self, transfer: &Transfer) -> Vec<Arc<Transfer>> {
        let mut earlier: Vec<Arc<Transfer>> = self
            .map()
            .values()
            .filter(|t| t.name == transfer.name && t.order < transfer.order)
            .cloned()
            .collect();
        earlier.sort_by_key(|t| t.order);
        earlier
    }

    /// Ends a transfer: its readers learn the outcome, and the next request starts afresh.
    pub fn close(&self, transfer: &Arc<Transfer>, outcome: Outcome) {
        self.map().retain(|_, t| !Arc::ptr_eq(t, transfer));
        transfer.news.send_replace(Some(outcome));
    }

    /// The transfers in flight now.
    pub fn all(&self) -> Vec<Arc<Transfer>> {
        self.map().values().cloned().collect()
    }
}

/// Where a transfer's chunks land: the file of a version, or the hidden data of a pull from
/// the origin while its digest is not known (its chunks are checked against the hashes this
/// peer published).
#[derive(Clone)]
pub enum Data {
    File(Arc<StoredFile>),
    Pull(Arc<PullPart>),
}

impl Data {
    fn holds(&self, index: u32) -> bool {
        match self {
            Data::File(f) => f.has_chunk(index),
            Data::Pull(p) => p.holds(index),
        }
    }
}

/// One file version on its way to this node (or already here: see [`Transfer::held`]), or a
/// pull from the origin that becomes one once every chunk hash is known.
pub struct Transfer {
    pub name: String,
    /// Size and chunk size: a version's from the start, a pull's once the origin and the
    /// tracker told them.
    shape: OnceLock<(u64, u32)>,
    /// The content digest: a version's from the start, a pull's once every chunk hash is known.
    digest: OnceLock<Hash>,
    /// When it was opened, relative to the others (see [`Transfers::before`]).
    order: u64,
    /// Where the chunks land; `None` until the download opened it. Held briefly.
    data: Mutex<Option<Data>>,
    /// The transfer of the version a pull found, which goes on where the pull ended. Held
    /// briefly.
    next: Mutex<Option<Arc<Transfer>>>,
    /// Changes whenever a chunk lands, the data is opened or the shape is known (the value
    /// stays `None`), and once when the transfer ends (the outcome).
    news: watch::Sender<Option<Outcome>>,
    /// Each reader's next chunk and its last, by reader id. Held briefly.
    readers: Mutex<HashMap<u64, (u32, u32)>>,
    /// Holders a worker is fetching from now. Held briefly.
    sources: Mutex<BTreeSet<String>>,
    /// Bytes landed, for the recent download rate.
    pub down: Meter,
}

/// Numbers readers, unique across transfers (a pull's readers move to the version's).
static NEXT_READER: AtomicU64 = AtomicU64::new(0);

impl Transfer {
    fn empty(name: String) -> Transfer {
        Transfer {
            name,
            shape: OnceLock::new(),
            digest: OnceLock::new(),
            order: 0,
            data: Mutex::new(None),
            next: Mutex::new(None),
            news: watch::Sender::new(None),
            readers: Mutex::new(HashMap::new()),
            sources: Mutex::new(BTreeSet::new()),
            down: Meter::default(),
        }
    }

    fn new(info: FileInfo, outcome: Option<Outcome>) -> Transfer {
        let t = Transfer::empty(info.name);
        let _ = t.shape.set((info.size, info.chunk_size));
        let _ = t.digest.set(info.digest);
        t.news.send_replace(outcome);
        t
    }

    /// A file held here in full: a transfer that has already ended well.
    pub fn held(file: Arc<StoredFile>) -> Arc<Transfer> {
        let t = Transfer::new(file.info.clone(), Some(Ok(file.path())));
        *t.lock_data() = Some(Data::File(file));
        Arc::new(t)
    }

    /// Size and chunk size, once known (see [`Transfer::ready`]).
    pub fn shape(&self) -> Option<(u64, u32)> {
        self.shape.get().copied()
    }

    /// The content digest, once known.
    pub fn digest(&self) -> Option<Hash> {
        self.digest.get().copied()
    }

    fn lock_data(&self) -> MutexGuard<'_, Option<Data>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn data(&self) -> Option<Data> {
        self.lock_data().clone()
    }

    fn next(&self) -> Option<Arc<Transfer>> {
        self.next.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The transfer this one goes on as now: itself, or the version a pull found.
    fn current(self: &Arc<Self>) -> Arc<Transfer> {
        let mut t = self.clone();
        while let Some(next) = t.next() {
            t = next;
        }
        t
    }

    /// Chunks held so far where they land.
    pub fn chunks_held(&self) -> u64 {
        match self.data() {
            Some(Data::File(f)) => f.have().count() as u64,
            Some(Data::Pull(p)) => p.held().len() as u64,
            None => 0,
        }
    }

    /// The engine opened (or reopened) the file the chunks land in.
    pub fn opened(&self, file: Arc<StoredFile>) {
        *self.lock_data() = Some(Data::File(file));
        self.news.send_modify(|_| {});
    }

    /// A pull from the origin holds its data in `part`, whose size and chunk size are settled.
    pub fn pulling_into(&self, part: Arc<PullPart>) {
        let _ = self.shape.set((part.size(), part.chunk_size()));
        *self.lock_data() = Some(Data::Pull(part));
        self.news.send_modify(|_| {});
    }

    /// A pull from the origin learnt its version's digest.
    pub fn pulled(&self, digest: Hash) {
        let _ = self.digest.set(digest);
    }

    /// This pull goes on as the transfer of the version it found: its readers follow.
    fn continued_by(&self, version: &Arc<Transfer>) {
        if let Some(shape) = version.shape() {
            let _ = self.shape.set(shape);
        }
        if let Some(digest) = version.digest() {
            let _ = self.digest.set(digest);
        }
        let mut readers = self.lock_readers();
        version.lock_readers().extend(readers.drain());
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(version.clone());
        drop(readers);
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

    /// Waits for the end of the transfer (of a pull: of the version's transfer it went on as).
    pub async fn finished(self: &Arc<Self>) -> Outcome {
        let mut t = self.clone();
        let mut rx = t.news.subscribe();
        loop {
            let outcome = rx.borrow_and_update().clone();
            if let Some(next) = t.next() {
                t = next;
                rx = t.news.subscribe();
                continue;
            }
            if let Some(outcome) = outcome {
                return outcome;
            }
            if rx.changed().await.is_err() {
                unreachable!("the sender lives in self");
            }
        }
    }

    /// Waits until this transfer ended, or went on as the transfer of the version it found (a
    /// pull): either way it no longer writes the name's partial file. Unlike
    /// [`Transfer::finished`], it does not follow the pull to its version, which may be the
    /// caller's own transfer.
    pub async fn left_off(&self) {
        let mut rx = self.news.subscribe();
        loop {
            if rx.borrow_and_update().is_some() || self.next().is_some() {
                return;
            }
            if rx.changed().await.is_err() {
                unreachable!("the sender lives in self");
            }
        }
    }

    /// Waits until the size and chunk size are known (at once but for a pull from the origin)
    /// and returns them; fails when the transfer ended before.
    pub async fn ready(&self) -> Result<(u64, u32), Arc<DownloadError>> {
        let mut rx = self.news.subscribe();
        loop {
            let outcome = rx.borrow_and_update().clone();
            if let Some(shape) = self.shape() {
                return Ok(shape);
            }
            if let Some(outcome) = outcome {
                let why = anyhow::anyhow!("{:?} ended before its size was known", self.name);
                return Err(outcome.err().unwrap_or(Arc::new(DownloadError::Local(why))));
            }
            if rx.changed().await.is_err() {
                unreachable!("the sender lives in self");
            }
        }
    }

    /// Waits until chunk `index` is held (verified and written; for a pull, its hash
    /// published) and returns where to read it; fails when the transfer ended without it.
    pub async fn chunk(self: &Arc<Self>, index: u32) -> Result<Data, Arc<DownloadError>> {
        let mut t = self.clone();
        let mut rx = t.news.subscribe();
        loop {
            // Marked seen before looking, so a chunk that lands after the look wakes us.
            let outcome = rx.borrow_and_update().clone();
            if let Some(next) = t.next() {
                t = next;
                rx = t.news.subscribe();
                continue;
            }
            if let Some(data) = t.data().filter(|d| d.holds(index)) {
                return Ok(data);
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
        let id = NEXT_READER.fetch_add(1, Ordering::Relaxed);
        let transfer = self.current();
        transfer.lock_readers().insert(id, (first, last));
        Reader { transfer, id }
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

/// A reader of a [`Transfer`]; moves its position forward with [`Reader::at`]. A reader of a
/// pull moves to the version's transfer once there is one.
pub struct Reader {
    transfer: Arc<Transfer>,
    id: u64,
}

impl Reader {
    /// The reader now waits for chunk `index`.
    pub fn at(&self, index: u32) {
        if let Some(span) = self.transfer.current().lock_readers().get_mut(&self.id) {
            span.0 = index;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.transfer.current().lock_readers().remove(&self.id);
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
fn pull_failure(e: &DownloadError) -> WantError {
    match e {
        DownloadError::Origin(o) if o.failure == Failure::NotFound => {
            WantError::NotFound(o.to_string())
        }
        DownloadError::Tracker(e) => WantError::Tracker(e.clone()),
        DownloadError::Shared(e) => pull_failure(e),
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
            // A name no peer shares comes from the origin, if there is one.
            Err(WantError::NotFound(_)) if digest.is_none() && self.origin.has(name) => {
                self.pull(name).await
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the pull of `name` from the origin, joined or started now, as soon as its size
    /// and chunk size are known: its readers get each chunk once it landed and its hash is
    /// published, before the version's digest is known.
    async fn pull(self: &Arc<Self>, name: &str) -> Result<Arc<Transfer>, WantError> {
        let mut pulls = self.transfers.watch_pulls();
        let mut started = None;
        loop {
            pulls.borrow_and_update();
            if let Some(t) = self.transfers.pulling(name) {
                return match t.ready().await {
                    Ok(_) => Ok(t),
                    Err(e) => Err(pull_failure(&e)),
                };
            }
            let task = started.get_or_insert_with(|| {
                let (peer, name) = (self.clone(), name.to_string());
                let span = tracing::info_span!("download", file = %name);
                let run = async move {
                    match download::locate_or_pull(&peer, &name, None).await {
                        Ok(loc) => peer.fetch(loc).await,
                        Err(e) => {
                            let failure = pull_failure(&e);
                            match failure {
                                WantError::NotFound(_) => tracing::info!(error = %e, "not found"),
                                _ => tracing::warn!(error = %e, "pull from the origin failed"),
                            }
                            Err(failure)
                        }
                    }
                };
                self.tasks.spawn(run.instrument(span))
            });
            // The pull registers itself once it is this node's turn to pull the name; a version
            // found meanwhile (pulled by someone else) is fetched like any other.
            tokio::select! {
                done = task => {
                    return done.map_err(|e| WantError::Other(format!("the pull task failed: {e}")))?;
                }
                _ = pulls.changed() => {}
            }
        }
    }

    /// Joins the download of the version `loc` names, or starts it in the background.
    async fn fetch(self: &Arc<Self>, loc: LocationsReply) -> Result<Arc<Transfer>, WantError> {
        let (name, digest) = (loc.file.name.clone(), loc.file.digest);
        let loc = match loc.hashes {
            // A pull from the origin ends with the hashes, and opening the version is what
            // lets the pull's readers follow it.
            Some(_) => loc,
            None => {
                if let Some(t) = self.transfers.map().get(&(name.clone(), Some(digest))) {
                    return Ok(t.clone());
                }
                // A new download needs the hash list, which a first look leaves out.
                match locate(self, &name, Some(digest), true).await {
                    Ok(loc) => loc,
                    Err(DownloadError::NoSuchFile(_)) => {
                        return Err(WantError::NotFound(format!(
                            "no peer shares {name:?} any more"
                        )))
                    }
                    Err(DownloadError::Tracker(e)) => return Err(WantError::Tracker(e)),
                    Err(e) => return Err(WantError::Other(e.to_string())),
                }
            }
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
    async fn a_pull_gives_each_chunk_once_it_landed_then_goes_on_as_its_version() {
        let transfers = Transfers::default();
        let pull = transfers.open_pull("f");
        assert!(Arc::ptr_eq(&transfers.pulling("f").unwrap(), &pull));
        let waiting = tokio::spawn({
            let pull = pull.clone();
            async move { pull.chunk(1).await.map(|d| matches!(d, Data::Pull(_))) }
        });
        let file = tempfile::tempfile().unwrap();
        let part = Arc::new(PullPart::new(file, 1000, 10));
        pull.pulling_into(part.clone());
        assert_eq!(pull.ready().await.unwrap(), (1000, 10));
        assert_eq!(pull.digest(), None);
        part.write(1, Hash::of(&[1; 10]), &[1; 10]).unwrap();
        pull.landed(10);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(got, Ok(Ok(Ok(true)))));

        let reader = pull.reader(0, 99);
        pull.pulled(info().digest);
        let Opened::Started(version) = transfers.open(&info()) else {
            panic!("the version is new")
        };
        assert!(transfers.pulling("f").is_none());
        assert_eq!(version.reader_count(), 1, "the pull's reader follows");
        reader.at(7);
        assert_eq!(version.urgent()[0], 7);
        transfers.close(&version, Ok(PathBuf::from("f")));
        let ended = tokio::time::timeout(Duration::from_secs(5), pull.finished()).await;
        assert!(matches!(ended, Ok(Ok(_))));
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
