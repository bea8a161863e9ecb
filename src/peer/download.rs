//! The download engine. One coordinator per file asks the tracker who holds what, runs one
//! worker per holder (at most `max_sources`), each keeping `pipeline_depth` chunk requests in
//! flight on one connection. Chunks are chosen rarest first with a random tie-break, verified
//! against the published hash, written at their offset and reported to the tracker at once.
//! A holder that fails is dropped (a liar for good, a dead or slow one for a cool-down) and its
//! chunks go back to the pool. Near the end, a missing chunk may be asked of a second holder.
//!
//! Readers of the file (the HTTP API) register in its [`Transfer`]: the chunks just ahead of
//! each reader's position are asked for before any other, in order.
//!
//! Lock order: `Job::sched` is a leaf lock, held only for in-memory bookkeeping; the
//! transfer's locks are taken and released before it, never under it.

use super::origin::{self, Origin, Source};
use super::store::{ChunkBuf, Finished, StoredFile, Unwritable, Written};
use super::tracker_client::TrackerError;
use super::transfers::{Opened, Transfer};
use super::Peer;
use crate::bitfield::Bitfield;
use crate::connection::{Connection, FrameError};
use crate::metrics::Active;
use crate::protocol::{
    decode_reply, encode_request, validate_name, ChunkHeader, ChunkRequest, ErrorCode, FileInfo,
    Hash, LocationsReply, Msg,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

/// A holder that failed for a reason other than lying may be tried again after this long.
const RETRY_HOLDER_AFTER: Duration = Duration::from_secs(10);
/// A holder whose upload slots were all busy may be asked again after this long.
const RETRY_BUSY_AFTER: Duration = Duration::from_secs(2);
/// Refreshes in a row with no usable holder before a download gives up.
const FRUITLESS_REFRESHES: u32 = 3;
/// At most this many holders are asked for the same chunk at once (endgame).
const MAX_REQUESTS_PER_CHUNK: u8 = 2;
/// An endgame duplicate waits at least this long (seconds) after the first request.
const ENDGAME_MIN_WAIT: f64 = 0.25;
/// The holder address that chunks fetched from the origin are recorded under.
const ORIGIN: &str = "origin";
/// Early refreshes (when a source runs dry) are at least this far apart.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(250);
/// Chunks from one connection being verified and written at once while the next arrives.
const LANDINGS: usize = 2;
/// Chunk buffers one download may hold (receiving, or landing), in bytes; at least
/// [`MIN_BUFFERS`] buffers, so that one connection can keep receiving while chunks land.
const BUFFER_BUDGET: usize = 32 << 20;
const MIN_BUFFERS: usize = LANDINGS + 1;
/// How long a source with nothing to ask waits for news before closing its connection.
const IDLE_GRACE: Duration = Duration::from_secs(1);
/// Rounds of download and final check before giving up: damage that comes back every time is
/// something a refetch cannot fix.
const FINAL_CHECKS: u32 = 3;
/// How long a holder that served bad data stays banned from that file, across attempts.
pub const BAN_FOR: Duration = Duration::from_secs(600);
/// Bans remembered at once; past this, the one that would end first is dropped.
pub const MAX_BANS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("no peer shares {0:?}")]
    NoSuchFile(String),
    #[error("{file:?}: no reachable holder has chunks {missing} (holders tried: {tried})")]
    NoHolders {
        file: String,
        missing: String,
        tried: usize,
    },
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    /// This peer will never write that name (invalid or unsafe, or its path taken by something
    /// that is not this peer's): retrying cannot help. Another version held here is no reason.
    #[error(transparent)]
    Unwritable(#[from] Unwritable),
    #[error("{0:#}")]
    Local(anyhow::Error),
    #[error("stopped before {0:?} was complete")]
    Stopped(String),
    /// The download this one joined failed so.
    #[error("{0}")]
    Shared(Arc<DownloadError>),
    /// The HTTP origin failed for good (not found, changed, or unavailable after retries).
    #[error(transparent)]
    Origin(#[from] origin::OriginError),
}

impl DownloadError {
    /// The same error, for everyone else who waited on the download.
    fn shared(&self) -> DownloadError {
        match self {
            DownloadError::NoSuchFile(n) => DownloadError::NoSuchFile(n.clone()),
            DownloadError::NoHolders {
                file,
                missing,
                tried,
            } => DownloadError::NoHolders {
                file: file.clone(),
                missing: missing.clone(),
                tried: *tried,
            },
            DownloadError::Tracker(e) => DownloadError::Tracker(e.clone()),
            DownloadError::Unwritable(e) => DownloadError::Unwritable(e.clone()),
            DownloadError::Local(e) => DownloadError::Local(anyhow::anyhow!("{e:#}")),
            DownloadError::Stopped(n) => DownloadError::Stopped(n.clone()),
            DownloadError::Shared(e) => DownloadError::Shared(e.clone()),
            DownloadError::Origin(e) => DownloadError::Origin(e.clone()),
        }
    }
}

/// Observes a download's progress (a terminal bar, log lines, or nothing).
pub trait Progress: Send + Sync {
    fn begin(&self, info: &FileInfo, chunks_held: u64);
    fn advance(&self, bytes: u64);
    fn end(&self);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &FileInfo, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

/// Downloads version `digest` of `name` (absent: the newest) into the data dir, resuming any
/// partial copy and replacing an older version held there, and returns its final path. A
/// download of that version already running (for an API reader, say) is joined, not repeated.
pub async fn download(
    peer: &Arc<Peer>,
    name: &str,
    digest: Option<Hash>,
    progress: Arc<dyn Progress>,
) -> Result<PathBuf, DownloadError> {
    let span = tracing::info_span!("download", file = %name);
    async {
        if let Some(f) = peer
            .store
            .find(name, digest.as_ref())
            .filter(|f| f.is_final())
        {
            return Ok(f.path());
        }
        validate_name(name).map_err(|r| Unwritable {
            name: name.to_string(),
            reason: r.message,
        })?;
        let first = locate_or_pull(peer, name, digest).await?;
        if first.file.name != name || digest.is_some_and(|d| d != first.file.digest) {
            return Err(DownloadError::Local(anyhow::anyhow!(
                "the tracker answered with {:?} (digest {}) to a request for {name:?}",
                first.file.name,
                first.file.digest.to_hex()
            )));
        }
        match peer.transfers.open(&first.file) {
            Opened::Started(transfer) => drive(peer, &first, &transfer, progress).await,
            Opened::Joined(transfer) => {
                tracing::info!("joining the download already running");
                transfer.finished().await.map_err(DownloadError::Shared)
            }
        }
    }
    .instrument(span)
    .await
}

/// Runs the download of the version `first` describes (with its hashes) for `transfer`, which
/// [`Transfers::open`](super::transfers::Transfers::open) just registered, and closes it with
/// the outcome.
pub async fn drive(
    peer: &Arc<Peer>,
    first: &LocationsReply,
    transfer: &Arc<Transfer>,
    progress: Arc<dyn Progress>,
) -> Result<PathBuf, DownloadError> {
    // Versions of one name share its partial file: let those asked for earlier finish first.
    for earlier in peer.transfers.before(transfer) {
        let digest = earlier.digest().map(|d| d.to_hex());
        tracing::info!(digest = ?digest, "waiting for the download of another version of this name");
        tokio::select! {
            _ = earlier.left_off() => {}
            _ = peer.stop.cancelled() => {}
        }
    }
    let started = Instant::now();
    let result = run(peer, first, transfer, progress).await;
    match &result {
        Ok(_) => {
            peer.metrics.downloads_completed.inc();
            peer.metrics
                .download_duration
                .observe(started.elapsed().as_secs_f64());
        }
        Err(DownloadError::Stopped(_)) => {}
        Err(e) => {
            peer.metrics.downloads_failed.inc();
            tracing::debug!(error = %e, "download failed");
        }
    }
    peer.update_file_gauges();
    let outcome = match &result {
        Ok(path) => Ok(path.clone()),
        Err(e) => Err(Arc::new(e.shared())),
    };
    peer.transfers.close(transfer, outcome);
    result
}

async fn run(
    peer: &Arc<Peer>,
    first: &LocationsReply,
    transfer: &Arc<Transfer>,
    progress: Arc<dyn Progress>,
) -> Result<PathBuf, DownloadError> {
    let name = &first.file.name;
    for _ in 0..FINAL_CHECKS {
        let file = begin(peer, first).await?;
        transfer.opened(file.clone());
        reuse_local(peer, &file).await?;
        transfer.filled();
        let held = file.have().count() as u64;
        let fetched = file.info.size - (held * u64::from(file.info.chunk_size)).min(file.info.size);
        let started = Instant::now();
        tracing::info!(
            size = file.info.size,
            chunks = file.info.chunks(),
            held,
            holders = first.peers.len(),
            "download started"
        );
        progress.begin(&file.info, held);
        let job = Arc::new(Job::new(
            peer.clone(),
            file.clone(),
            progress.clone(),
            transfer.clone(),
        ));
        job.update_holders(first);
        let outcome = job.clone().coordinate().await;
        progress.end();
        outcome?;
        let finished = {
            let (peer, file) = (peer.clone(), file.clone());
            blocking(move || peer.store.finish(&file)).await?
        };
        match finished {
            Finished::InPlace(path) => {
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(
                    path = %path.display(),
                    size_bytes = first.file.size,
                    fetched_bytes = fetched,
                    duration_seconds = seconds,
                    bytes_per_second = (fetched as f64 / seconds.max(1e-3)).round() as u64,
                    sources = job.sources(),
                    "download complete"
                );
                peer.retire_replaced(&file).await;
                if file.info.chunks() == 0 {
                    // An empty file has no chunk to register with message 4: offer the file
                    // itself, so that this peer is listed as one of its holders.
                    peer.resync_later();
                }
                return Ok(path);
            }
            Finished::Damaged(why) => {
                tracing::warn!(reason = %why, "final check failed, fetching the damage again");
            }
        }
    }
    Err(DownloadError::Local(anyhow::anyhow!(
        "{name:?} failed its final check {FINAL_CHECKS} times in a row: something keeps changing \
         its partial file in {}; stop whatever writes there",
        peer.store.dir().display()
    )))
}

/// The tracker's view of version `digest` of `name` (absent: the newest), with its hashes. A
/// name no peer shares is first pulled from the origin, if this peer has one (see [`origin`]).
pub(super) async fn locate_or_pull(
    peer: &Arc<Peer>,
    name: &str,
    digest: Option<Hash>,
) -> Result<LocationsReply, DownloadError> {
    let found = locate(peer, name, digest, true).await;
    match &found {
        Err(DownloadError::NoSuchFile(_)) if digest.is_none() && peer.origin.has(name) => {
            pull_from_origin(peer, &peer.origin, name).await
        }
        _ => found,
    }
}

/// Pulls this peer's share of `name` from the origin until the tracker knows the version, and
/// opens what it fetched as the partial download of that version (its chunks re-checked and
/// reported as held). One pull of a name at a time here: a second caller waits for the first
/// and then finds the version. The pull is a transfer that readers follow chunk by chunk; it
/// goes on as the version's transfer once the caller opens that.
async fn pull_from_origin(
    peer: &Arc<Peer>,
    origin: &Arc<Origin>,
    name: &str,
) -> Result<LocationsReply, DownloadError> {
    let _turn = origin.turn(name).await;
    match locate(peer, name, None, true).await {
        Err(DownloadError::NoSuchFile(_)) => {}
        found => return found,
    }
    let transfer = peer.transfers.open_pull(name);
    let pulled = pull_version(peer, origin, name, &transfer).await;
    match &pulled {
        Ok(loc) => transfer.pulled(loc.file.digest),
        Err(e) => peer.transfers.close(&transfer, Err(Arc::new(e.shared()))),
    }
    pulled
}

async fn pull_version(
    peer: &Arc<Peer>,
    origin: &Arc<Origin>,
    name: &str,
    transfer: &Arc<Transfer>,
) -> Result<LocationsReply, DownloadError> {
    let pulled = origin::pull(peer, origin, name, transfer).await?;
    let loc = locate(peer, name, Some(pulled.digest), true).await?;
    let hashes = loc.hashes.clone().unwrap_or_default();
    if loc.file.size != pulled.size || hashes.digest() != loc.file.digest {
        return Err(DownloadError::Local(anyhow::anyhow!(
            "the tracker's version {} of {name:?} does not match what the origin sent",
            loc.file.digest.to_hex()
        )));
    }
    let have = origin::held_bits(&pulled.held, loc.file.chunks() as usize);
    let (p, info, published) = (peer.clone(), loc.file.clone(), loc.published);
    blocking(move || p.store.adopt_origin_part(&info, &hashes, published, &have)).await?;
    let file = begin(peer, &loc).await?;
    // Chunks that landed as the version completed were never published: say so now. The
    // other owners of the name (several trackers) learn the version from the re-registration.
    for index in file.have().ones() {
        peer.report_chunk(&file, index as u32);
    }
    peer.resync_later();
    Ok(loc)
}

/// Opens the partial download (blocking work, so on a blocking thread).
async fn begin(peer: &Arc<Peer>, loc: &LocationsReply) -> Result<Arc<StoredFile>, DownloadError> {
    let hashes = loc.hashes.clone().unwrap_or_default();
    let (info, published) = (loc.file.clone(), loc.published);
    let peer = peer.clone();
    blocking(move || peer.store.begin_download(&info, &hashes, published)).await
}

/// Runs blocking store work on a blocking thread; its failure is local (the disk), which no
/// holder can fix, or a name the store will never write.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, DownloadError> {
    let refused = |e: anyhow::Error| match e.downcast::<Unwritable>() {
        Ok(unwritable) => DownloadError::Unwritable(unwritable),
        Err(e) => DownloadError::Local(e),
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| DownloadError::Local(e.into()))?
        .map_err(refused)
}

/// Copies the chunks of `file` that some file held here already has (same hash) instead of
/// downloading them, and reports them held.
async fn reuse_local(peer: &Arc<Peer>, file: &Arc<StoredFile>) -> Result<(), DownloadError> {
    let reused = {
        let (peer, file) = (peer.clone(), file.clone());
        blocking(move || peer.store.reuse_local(&file)).await?
    };
    if !reused.is_empty() {
        tracing::info!(chunks = reused.len(), "chunks copied from files held here");
    }
    peer.metrics.chunks_reused.inc_by(reused.len() as u64);
    for index in reused {
        peer.report_chunk(file, index);
    }
    Ok(())
}

pub(super) async fn locate(
    peer: &Peer,
    name: &str,
    digest: Option<Hash>,
    hashes: bool,
) -> Result<LocationsReply, DownloadError> {
    match peer.trackers.locations(name, digest, hashes).await {
        Err(e) if e.code() == Some(ErrorCode::UnknownFile) => {
            Err(DownloadError::NoSuchFile(name.to_string()))
        }
        other => Ok(other?),
    }
}

/// Holders that served bad data, remembered per file version across download attempts: a
/// daemon retries a failed download, and asking the same liar on every retry wastes each one.
/// Bounded in time ([`BAN_FOR`]) and number ([`MAX_BANS`]).
#[derive(Default)]
pub struct Bans {
    /// (file digest, holder address) -> when the ban ends. Held briefly, never across an await.
    until: Mutex<HashMap<(Hash, String), Instant>>,
}

impl Bans {
    fn lock(&self) -> MutexGuard<'_, HashMap<(Hash, String), Instant>> {
        self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ban(&self, file: Hash, addr: &str, now: Instant) {
        let mut bans = self.lock();
        bans.retain(|_, end| *end > now);
        if bans.len() >= MAX_BANS {
            let first_to_end = bans.iter().min_by_key(|(_, end)| **end);
            if let Some(key) = first_to_end.map(|(key, _)| key.clone()) {
                bans.remove(&key);
            }
        }
        bans.insert((file, addr.to_string()), now + BAN_FOR);
    }

    fn is_banned(&self, file: Hash, addr: &str, now: Instant) -> bool {
        let key = (file, addr.to_string());
        self.lock().get(&key).is_some_and(|end| *end > now)
    }
}

struct HolderState {
    have: Bitfield,
    running: bool,
    /// Lied, in this download or one before (see [`Bans`]): not asked again.
    banned: bool,
    /// Dead or slow: not before this instant.
    retry_at: Option<Instant>,
    delivered: u64,
}

impl HolderState {
    fn usable(&self, now: Instant) -> bool {
        !self.banned && self.retry_at.is_none_or(|t| t <= now)
    }
}

struct Scheduler {
    have: Bitfield,
    /// Requests outstanding per chunk.
    inflight: Vec<u8>,
    /// When the oldest outstanding request for each chunk was sent.
    requested_at: Vec<Option<Instant>>,
    /// Usable holders per chunk.
    availability: Vec<u32>,
    holders: HashMap<String, HolderState>,
    /// Running average of chunk transfer times, seconds (0 until the first chunk).
    typical_secs: f64,
    rng: StdRng,
    /// A local failure (disk full, unwritable dir) that ends the download.
    fatal: Option<anyhow::Error>,
}

impl Scheduler {
    fn new(have: Bitfield) -> Scheduler {
        let n = have.len();
        Scheduler {
            have,
            inflight: vec![0; n],
            requested_at: vec![None; n],
            availability: vec![0; n],
            holders: HashMap::new(),
            typical_secs: 0.0,
            rng: StdRng::from_entropy(),
            fatal: None,
        }
    }

    fn recount(&mut self) {
        let now = Instant::now();
        self.availability.iter_mut().for_each(|a| *a = 0);
        for h in self.holders.values().filter(|h| h.usable(now)) {
            for i in h.have.ones() {
                self.availability[i] += 1;
            }
        }
    }

    /// A request may be duplicated once it is overdue: three typical transfer times.
    fn overdue(&self, i: usize, now: Instant) -> bool {
        let wait = if self.typical_secs > 0.0 {
            (3.0 * self.typical_secs).max(ENDGAME_MIN_WAIT)
        } else {
            1.0
        };
        self.requested_at[i].is_some_and(|t| now.duration_since(t).as_secs_f64() > wait)
    }

    /// Whether chunk `i` could be asked of holder `h` now (`mine`: what `h` already has in flight).
    fn askable(
        &self,
        h: &HolderState,
        i: usize,
        now: Instant,
        endgame: bool,
        mine: &[u32],
    ) -> bool {
        if self.have.get(i) || !h.have.get(i) {
            return false;
        }
        if self.inflight[i] == 0 {
            return true;
        }
        endgame
            && self.inflight[i] < MAX_REQUESTS_PER_CHUNK
            && self.overdue(i, now)
            && !mine.contains(&(i as u32))
    }

    /// Endgame: every missing chunk has been requested from someone.
    fn endgame(&self) -> bool {
        (0..self.have.len()).all(|i| self.have.get(i) || self.inflight[i] > 0)
    }

    /// Whether holder `addr` has anything to be asked for now.
    fn has_work(&self, addr: &str, now: Instant) -> bool {
        let endgame = self.endgame();
        let h = &self.holders[addr];
        (0..self.have.len()).any(|i| self.askable(h, i, now, endgame, &[]))
    }

    /// The next chunk to ask `addr` for: the rarest missing chunk it holds that nobody is
    /// fetching, from a random starting point. In the endgame (everything missing is requested
    /// somewhere), an overdue request may be duplicated here; there is no cancel message, so a
    /// duplicate costs the uploader a whole chunk and is kept for stragglers only. Chunks in
    /// `urgent` (what readers wait for, most urgent first) go before all others.
    fn pick(&mut self, addr: &str, mine: &[u32], urgent: &[u32]) -> Option<u32> {
        let n = self.have.len();
        if n == 0 {
            return None;
        }
        let now = Instant::now();
        let endgame = self.endgame();
        let h = &self.holders[addr];
        let wanted_now = urgent
            .iter()
            .map(|&i| i as usize)
            .find(|&i| i < n && self.inflight[i] == 0 && self.askable(h, i, now, endgame, mine));
        if let Some(i) = wanted_now {
            self.inflight[i] += 1;
            self.requested_at[i].get_or_insert(now);
            return Some(i as u32);
        }
        let start = self.rng.gen_range(0..n);
        let mut best: Option<(u32, usize)> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if !self.askable(h, i, now, endgame, mine) {
                continue;
            }
            // Fresh chunks rank before duplicates; among fresh ones, the rarest first.
            let a = if self.inflight[i] == 0 {
                self.availability[i]
            } else {
                u32::MAX
            };
            if best.is_none_or(|(b, _)| a < b) {
                best = Some((a, i));
                if a <= 1 {
                    break;
                }
            }
        }
        let (_, chosen) = best?;
        self.inflight[chosen] += 1;
        self.requested_at[chosen].get_or_insert(now);
        Some(chosen as u32)
    }

    /// A request for chunk `i` ended (answered, failed or abandoned).
    fn settle(&mut self, i: u32) {
        let i = i as usize;
        self.inflight[i] = self.inflight[i].saturating_sub(1);
        if self.inflight[i] == 0 {
            self.requested_at[i] = None;
        }
    }

    fn observe(&mut self, secs: f64) {
        self.typical_secs = if self.typical_secs == 0.0 {
            secs
        } else {
            0.8 * self.typical_secs + 0.2 * secs
        };
    }
}

struct Job {
    peer: Arc<Peer>,
    file: Arc<StoredFile>,
    progress: Arc<dyn Progress>,
    /// Told of every chunk held and every source used; gives the chunks readers wait for.
    transfer: Arc<Transfer>,
    sched: Mutex<Scheduler>,
    /// Wakes the coordinator (a source ended or starves, the file completed).
    wake: Notify,
    /// Wakes idle sources: holders were refreshed or chunks went back to the pool.
    changed: Notify,
    /// A source had nothing to ask: refresh holders early.
    starving: AtomicBool,
    buffers: Arc<Buffers>,
}

enum Fault {
    /// Served bytes that do not match the hash (`reason` `corrupt_chunk`), or a header that
    /// does not match the request (`wrong_header`); `reason` labels the ban metric.
    Lied { reason: &'static str, why: String },
    /// Unreachable, reset, stalled or refused.
    Failed(String),
    /// Healthy but serving others: its upload slots stayed full.
    Busy(String),
}

impl Job {
    fn new(
        peer: Arc<Peer>,
        file: Arc<StoredFile>,
        progress: Arc<dyn Progress>,
        transfer: Arc<Transfer>,
    ) -> Job {
        let sched = Mutex::new(Scheduler::new(file.have()));
        let buffers = Arc::new(Buffers::new(file.info.chunk_size));
        Job {
            buffers,
            peer,
            file,
            progress,
            transfer,
            sched,
            wake: Notify::new(),
            changed: Notify::new(),
            starving: AtomicBool::new(false),
        }
    }

    fn sched(&self) -> MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn name(&self) -> &str {
        &self.file.info.name
    }

    fn update_holders(&self, loc: &LocationsReply) {
        let chunks = self.file.info.chunks() as usize;
        let now = Instant::now();
        let mut s = self.sched();
        for h in &loc.peers {
            let Some(have) = Bitfield::from_bytes(h.have.0.clone(), chunks) else {
                continue;
            };
            match s.holders.get_mut(&h.addr) {
                Some(known) => known.have = have,
                None => {
                    let banned = self
                        .peer
                        .bans
                        .is_banned(self.file.info.digest, &h.addr, now);
                    let state = HolderState {
                        have,
                        running: false,
                        banned,
                        retry_at: None,
                        delivered: 0,
                    };
                    s.holders.insert(h.addr.clone(), state);
                }
            }
        }
        s.recount();
        drop(s);
        self.changed.notify_waiters();
    }

    /// Runs workers until the file is complete, no holder is left, or the peer stops.
    async fn coordinate(self: Arc<Self>) -> Result<(), DownloadError> {
        let cfg = &self.peer.cfg;
        let mut workers = JoinSet::new();
        let mut last_refresh = tokio::time::Instant::now();
        let mut next_refresh = last_refresh + cfg.refresh_interval;
        let mut fruitless = 0;
        loop {
            if self.sched().have.is_full() {
                return Ok(());
            }
            if let Some(e) = self.sched().fatal.take() {
                return Err(DownloadError::Local(e));
            }
            for addr in self.eligible(cfg.max_sources.saturating_sub(workers.len())) {
                let span = tracing::debug_span!("source", holder = %addr);
                workers.spawn(self.clone().worker(addr).instrument(span));
            }
            if workers.is_empty() && tokio::time::Instant::now() < next_refresh {
                // Nobody to ask: look for new holders now rather than at the next tick.
                next_refresh = tokio::time::Instant::now();
            }
            tokio::select! {
                _ = self.peer.stop.cancelled() => return Err(DownloadError::Stopped(self.name().to_string())),
                Some(_) = workers.join_next(), if !workers.is_empty() => {
                    // A source ran dry: new holders may have what we miss; ask soon, not at the tick.
                    next_refresh = next_refresh.min(last_refresh + MIN_REFRESH_GAP);
                }
                _ = self.wake.notified() => {
                    if self.starving.swap(false, Ordering::Relaxed) {
                        next_refresh = next_refresh.min(last_refresh + MIN_REFRESH_GAP);
                    }
                }
                // Re-evaluate now and then: endgame requests become overdue with time alone.
                _ = tokio::time::sleep(Duration::from_secs_f64(ENDGAME_MIN_WAIT)) => {}
                _ = tokio::time::sleep_until(next_refresh) => {
                    last_refresh = tokio::time::Instant::now();
                    next_refresh = last_refresh + cfg.refresh_interval;
                    let digest = Some(self.file.info.digest);
                    match locate(&self.peer, self.name(), digest, false).await {
                        Ok(loc) => self.update_holders(&loc),
                        Err(e) => tracing::debug!(error = %e, "refresh failed"),
                    }
                    if workers.is_empty() && self.eligible_count() == 0 {
                        fruitless += 1;
                        if fruitless >= FRUITLESS_REFRESHES {
                            let Some(source) = self.peer.origin.source(self.name()) else {
                                return Err(self.no_holders());
                            };
                            self.fill_from_origin(&source).await?;
                            fruitless = 0;
                        }
                    } else {
                        fruitless = 0;
                    }
                }
            }
        }
    }

    /// The last resort for the chunks no usable holder has (their holders all left): the
    /// origin, each chunk checked against its published hash, so only the same content passes.
    async fn fill_from_origin(self: &Arc<Self>, source: &Source) -> Result<(), DownloadError> {
        let orphans: Vec<u32> = {
            let s = self.sched();
            (0..s.have.len())
                .filter(|&i| !s.have.get(i) && s.availability[i] == 0 && s.inflight[i] == 0)
                .map(|i| i as u32)
                .collect()
        };
        if orphans.is_empty() {
            return Err(self.no_holders());
        }
        tracing::info!(
            chunks = orphans.len(),
            "no peer holds these chunks any more; fetching them from the origin"
        );
        let info = &self.file.info;
        let (peer, remote) = (&self.peer, origin::head(&self.peer, source).await?);
        for index in orphans {
            let sent = Instant::now();
            let hash = self.file.hashes.0[index as usize];
            let known = (info, &remote);
            let data = origin::fetch_known(peer, &peer.origin, source, known, index, hash).await?;
            let bytes = data.len() as u64;
            let file = self.file.clone();
            let written = blocking(move || file.write_chunk(index, &data)).await?;
            self.record(ORIGIN, index, sent, bytes, written);
        }
        Ok(())
    }

    /// Holders that hold some chunk we miss, now or once their in-flight requests settle.
    fn eligible_count(&self) -> usize {
        let now = Instant::now();
        let s = self.sched();
        s.holders
            .values()
            .filter(|h| h.usable(now) && !h.running && h.have.has_any_not_in(&s.have))
            .count()
    }

    /// Marks up to `room` idle, usable holders with a missing chunk as running and returns them.
    fn eligible(&self, room: usize) -> Vec<String> {
        let now = Instant::now();
        let mut s = self.sched();
        let mut chosen: Vec<String> = s
            .holders
            .iter()
            .filter(|(a, h)| h.usable(now) && !h.running && s.has_work(a, now))
            .map(|(a, _)| a.clone())
            .collect();
        let len = chosen.len();
        for k in 0..len {
            let j = s.rng.gen_range(k..len);
            chosen.swap(k, j);
        }
        chosen.truncate(room);
        for a in &chosen {
            s.holders.get_mut(a).expect("listed above").running = true;
        }
        chosen
    }

    /// Holders that delivered at least one chunk.
    fn sources(&self) -> usize {
        let s = self.sched();
        s.holders.values().filter(|h| h.delivered > 0).count()
    }

    fn no_holders(&self) -> DownloadError {
        let s = self.sched();
        let missing: Vec<String> = (0..s.have.len())
            .filter(|&i| !s.have.get(i))
            .take(8)
            .map(|i| i.to_string())
            .collect();
        let more = if s.have.len() - s.have.count() > 8 {
            ",..."
        } else {
            ""
        };
        DownloadError::NoHolders {
            file: self.name().to_string(),
            missing: format!("{}{more}", missing.join(",")),
            tried: s.holders.len(),
        }
    }

    async fn worker(self: Arc<Self>, addr: String) {
        let mut queue = VecDeque::new();
        let mut landings = VecDeque::new();
        self.transfer.source_started(&addr);
        let mut outcome = self.fetch_from(&addr, &mut queue, &mut landings).await;
        self.transfer.source_ended(&addr);
        // A chunk that arrived whole before the connection ended is still worth keeping.
        for l in landings {
            if let Err(fault) = self.land(l).await {
                outcome = Err(fault);
            }
        }
        let mut s = self.sched();
        for p in queue.drain(..) {
            s.settle(p.index);
        }
        let holder = s
            .holders
            .get_mut(&addr)
            .expect("workers run for known holders");
        holder.running = false;
        match outcome {
            Ok(()) => {}
            Err(Fault::Lied { reason, why }) => {
                holder.banned = true;
                let m = &self.peer.metrics;
                m.holders_dropped.inc();
                m.holders_banned.with_label_values(&[reason]).inc();
                self.peer
                    .bans
                    .ban(self.file.info.digest, &addr, Instant::now());
                tracing::warn!(holder = %addr, reason, detail = %why, banned_seconds = BAN_FOR.as_secs(), "banned holder from this file");
                s.recount();
            }
            Err(Fault::Busy(why)) => {
                holder.retry_at = Some(Instant::now() + RETRY_BUSY_AFTER);
                tracing::debug!(holder = %addr, reason = %why, "holder busy, trying others");
                s.recount();
            }
            Err(Fault::Failed(why)) => {
                holder.retry_at = Some(Instant::now() + RETRY_HOLDER_AFTER);
                self.peer.metrics.holders_dropped.inc();
                tracing::info!(holder = %addr, reason = %why, "holder failed, trying others");
                s.recount();
            }
        }
        drop(s);
        self.changed.notify_waiters();
        self.wake.notify_one();
    }

    /// Keeps `pipeline_depth` requests in flight to one holder until it has nothing we need,
    /// even after waiting [`IDLE_GRACE`] for news (a refresh, a released chunk). Each chunk is
    /// verified and written while the next ones arrive (`landings`, at most [`LANDINGS`]).
    async fn fetch_from(
        self: &Arc<Self>,
        addr: &str,
        queue: &mut VecDeque<Pending>,
        landings: &mut VecDeque<Landing>,
    ) -> Result<(), Fault> {
        let cfg = &self.peer.cfg;
        let mut conn = self.peer.dial_holder(addr).await.map_err(Fault::Failed)?;
        let failed = |e: std::io::Error| Fault::Failed(format!("send failed: {e}"));
        loop {
            while queue.len() < cfg.pipeline_depth {
                let mine: Vec<u32> = queue.iter().map(|p| p.index).collect();
                let urgent = self.transfer.urgent();
                let Some(index) = self.sched().pick(addr, &mine, &urgent) else {
                    break;
                };
                let req = ChunkRequest {
                    file: self.name().to_string(),
                    digest: Some(self.file.info.digest),
                    index,
                    secret: cfg.secret.clone(),
                    peer_id: self.peer.peer_id(),
                };
                conn.write_line(&encode_request(Msg::ChunkRequest, &req))
                    .await
                    .map_err(failed)?;
                let active = Active::new(&self.peer.metrics.active_transfers);
                queue.push_back(Pending {
                    index,
                    sent: Instant::now(),
                    _active: active,
                });
            }
            let Some(&Pending { index, sent, .. }) = queue.front() else {
                if let Some(l) = landings.pop_front() {
                    if !self.land(l).await? {
                        return Ok(());
                    }
                    continue;
                }
                // Nothing to ask this holder now: say so (the coordinator refreshes early),
                // then give news a moment before closing the connection.
                self.starving.store(true, Ordering::Relaxed);
                self.wake.notify_one();
                let news = tokio::time::timeout(IDLE_GRACE, self.changed.notified())
                    .await
                    .is_ok();
                if news && self.sched().has_work(addr, Instant::now()) {
                    continue;
                }
                return Ok(());
            };
            conn.flush().await.map_err(failed)?;
            let received = self.receive(&mut conn, index).await;
            queue.pop_front();
            let data = match received {
                Ok(data) => data,
                Err(failure) => {
                    let mut s = self.sched();
                    s.settle(index);
                    match failure {
                        Received::NotHeld => {
                            // The tracker's view was stale: forget that this holder has it.
                            if let Some(h) = s.holders.get_mut(addr) {
                                h.have.clear(index as usize);
                            }
                            continue;
                        }
                        Received::Fault(f) => return Err(f),
                    }
                }
            };
            landings.push_back(self.verify_and_write(addr, index, sent, data));
            if landings.len() > LANDINGS {
                let oldest = landings.pop_front().expect("more than none");
                if !self.land(oldest).await? {
                    return Ok(());
                }
            }
        }
    }

    /// Reads the reply to the request for `index` into a buffer of the download's.
    async fn receive(&self, conn: &mut Connection, index: u32) -> Result<Loan, Received> {
        let fault = |why: String| Received::Fault(Fault::Failed(why));
        let line = match conn.read_line().await {
            Ok(Some(line)) => line,
            Ok(None) => return Err(fault("closed the connection".into())),
            Err(e @ (FrameError::Stalled(_) | FrameError::Idle(_))) => {
                return Err(fault(format!("stalled: {e}")))
            }
            Err(e) => return Err(fault(e.to_string())),
        };
        let header: ChunkHeader = match decode_reply(Msg::ChunkRequest, &line) {
            Ok(h) => h,
            // Not there, or an origin asks us to fetch it from the peer it just sent it to.
            Err(r) if matches!(r.code, ErrorCode::NotFound | ErrorCode::Elsewhere) => {
                return Err(Received::NotHeld)
            }
            Err(r) if r.code == ErrorCode::Busy => {
                return Err(Received::Fault(Fault::Busy(r.message)))
            }
            Err(r) => return Err(fault(format!("refused chunk {index}: {r}"))),
        };
        let (_, expected) = self.file.info.chunk_span(index);
        if header.file != self.name() || header.index != index || header.length != expected {
            let why = format!(
                "answered {}#{} ({} bytes) to a request for chunk {index}",
                header.file, header.index, header.length
            );
            let reason = "wrong_header";
            return Err(Received::Fault(Fault::Lied { reason, why }));
        }
        let mut buf = self.buffers.lend().await;
        conn.read_raw(buf.reset(expected as usize))
            .await
            .map_err(|e| fault(format!("chunk body: {e}")))?;
        Ok(buf)
    }

    /// Verifies, writes and books a received chunk on a blocking thread, so that the next
    /// chunk arrives meanwhile and this one counts as held the moment it is on disk.
    fn verify_and_write(
        self: &Arc<Self>,
        addr: &str,
        index: u32,
        sent: Instant,
        data: Loan,
    ) -> Landing {
        let (job, addr) = (self.clone(), addr.to_string());
        tokio::task::spawn_blocking(move || {
            let written = if Hash::of(&data) == job.file.hashes.0[index as usize] {
                job.file.write_chunk(index, &data).map(Some)
            } else {
                Ok(None)
            };
            // The buffer goes back to the pool when `data` drops, after this. A failed chunk may
            // be picked again only now; a kept one is settled as it is marked held, under one
            // lock, so no worker can slip in between and fetch it twice.
            match written {
                Ok(Some(w)) => {
                    job.record(&addr, index, sent, data.len() as u64, w);
                    Landed::Kept
                }
                Ok(None) => {
                    job.sched().settle(index);
                    job.peer.metrics.verify_failures.inc();
                    Landed::Corrupt(index)
                }
                Err(e) => {
                    job.sched().settle(index);
                    job.fail(e)
                }
            }
        })
    }

    /// Waits until a chunk has landed; false when the download cannot go on (a write failed).
    async fn land(&self, landing: Landing) -> Result<bool, Fault> {
        let landed = match landing.await {
            Ok(landed) => landed,
            Err(e) => self.fail(anyhow::anyhow!("write task failed: {e}")),
        };
        match landed {
            Landed::Kept => Ok(true),
            Landed::Corrupt(index) => Err(Fault::Lied {
                reason: "corrupt_chunk",
                why: format!("chunk {index} does not match its hash"),
            }),
            Landed::Fatal => Ok(false),
        }
    }

    /// Stops the download on an error that no other holder can fix (the disk).
    fn fail(&self, e: anyhow::Error) -> Landed {
        self.sched().fatal = Some(e);
        self.wake.notify_one();
        Landed::Fatal
    }

    /// Books a verified, written chunk. Runs without awaiting, and marks the chunk held in the
    /// scheduler last: the coordinator declares the file complete from that mark and then
    /// drops the workers, so nothing may remain to do after it.
    fn record(&self, addr: &str, index: u32, sent: Instant, bytes: u64, written: Written) {
        let m = &self.peer.metrics;
        if written == Written::Duplicate {
            self.sched().settle(index);
            m.chunks_duplicate.inc();
            return;
        }
        let secs = sent.elapsed().as_secs_f64();
        m.chunks_downloaded.inc();
        m.bytes_downloaded.inc_by(bytes);
        let from = if addr == ORIGIN { "upstream" } else { "peers" };
        self.peer.count_fetched(self.name(), from, bytes as usize);
        self.peer.down.add(bytes);
        m.chunk_transfer_duration.observe(secs);
        self.peer.report_chunk(&self.file, index);
        self.progress.advance(bytes);
        self.transfer.landed(bytes);
        tracing::trace!(chunk = index, holder = %addr, "chunk verified");
        let mut s = self.sched();
        s.settle(index);
        s.observe(secs);
        if let Some(h) = s.holders.get_mut(addr) {
            h.delivered += 1;
        }
        s.have.set(index as usize);
        let complete = s.have.is_full();
        drop(s);
        if complete {
            self.wake.notify_one();
        }
    }
}

/// A chunk request on the wire; counted as an active transfer while it lives, also when a
/// cancelled worker drops it.
struct Pending {
    index: u32,
    sent: Instant,
    _active: Active,
}

/// A received chunk being verified, written and booked on a blocking thread.
type Landing = tokio::task::JoinHandle<Landed>;

/// The chunk buffers of one download: at most about [`BUFFER_BUDGET`] bytes of them exist at
/// once, however many holders it talks to, and each is reused by later chunks.
struct Buffers {
    free: Mutex<Vec<ChunkBuf>>,
    slots: Arc<Semaphore>,
}

/// A buffer on loan from [`Buffers`]; it goes back when dropped.
struct Loan {
    buf: ChunkBuf,
    pool: Arc<Buffers>,
    _slot: OwnedSemaphorePermit,
}

impl Buffers {
    fn new(chunk_size: u32) -> Buffers {
        let count = (BUFFER_BUDGET / chunk_size as usize).max(MIN_BUFFERS);
        Buffers {
            free: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(count)),
        }
    }

    /// Waits until a buffer may be used.
    async fn lend(self: &Arc<Self>) -> Loan {
        let slot = self.slots.clone().acquire_owned().await;
        let buf = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        Loan {
            buf: buf.unwrap_or_default(),
            pool: self.clone(),
            _slot: slot.expect("the semaphore is never closed"),
        }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.pool
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buf);
    }
}

impl std::ops::Deref for Loan {
    type Target = ChunkBuf;
    fn deref(&self) -> &ChunkBuf {
        &self.buf
    }
}

impl std::ops::DerefMut for Loan {
    fn deref_mut(&mut self) -> &mut ChunkBuf {
        &mut self.buf
    }
}

enum Landed {
    Kept,
    /// Did not match its hash: the holder lied.
    Corrupt(u32),
    /// Could not be written; the download is stopped.
    Fatal,
}

enum Received {
    NotHeld,
    Fault(Fault),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn a_download_holds_a_bounded_number_of_chunk_buffers_and_reuses_them() {
        let pool = Arc::new(Buffers::new(64 << 20));
        let mut loans = Vec::new();
        for _ in 0..MIN_BUFFERS {
            let mut loan = pool.lend().await;
            loan.reset(4096);
            loans.push(loan);
        }
        assert_eq!(pool.slots.available_permits(), 0, "a fourth could be lent");
        let returned = loans.pop().expect("lent").as_ptr();
        assert_eq!(
            pool.lend().await.as_ptr(),
            returned,
            "a new buffer, not the one returned"
        );
        let small = Buffers::new(4096);
        assert_eq!(small.slots.available_permits(), BUFFER_BUDGET / 4096);
    }

    #[test]
    fn bans_outlive_an_attempt_but_end_and_stay_bounded() {
        let bans = Bans::default();
        let (file, t0) = (Hash([1; 32]), Instant::now());
        bans.ban(file, "a:1", t0);
        assert!(bans.is_banned(file, "a:1", t0 + BAN_FOR / 2));
        assert!(!bans.is_banned(Hash([2; 32]), "a:1", t0), "another version");
        assert!(!bans.is_banned(file, "a:1", t0 + BAN_FOR), "bans end");
        for i in 0..MAX_BANS + 10 {
            let at = t0 + Duration::from_millis(i as u64);
            bans.ban(file, &format!("h{i}"), at);
        }
        assert_eq!(bans.lock().len(), MAX_BANS);
        assert!(
            !bans.is_banned(file, "h0", t0),
            "the first to end went first"
        );
        assert!(bans.is_banned(file, &format!("h{}", MAX_BANS + 9), t0));
    }

    fn bits(v: &[bool]) -> Bitfield {
        let mut b = Bitfield::new(v.len());
        for (i, _) in v.iter().enumerate().filter(|(_, &x)| x) {
            b.set(i);
        }
        b
    }

    fn sched(have: &[bool], holders: &[(&str, &[bool])]) -> Scheduler {
        let mut s = Scheduler::new(bits(have));
        s.rng = StdRng::seed_from_u64(7);
        for (addr, h) in holders {
            let state = HolderState {
                have: bits(h),
                running: false,
                banned: false,
                retry_at: None,
                delivered: 0,
            };
            s.holders.insert(addr.to_string(), state);
        }
        s.recount();
        s
    }

    #[test]
    fn picks_the_rarest_missing_chunk_first() {
        let t = true;
        let f = false;
        let mut s = sched(
            &[f, f, f],
            &[("a", &[t, t, t]), ("b", &[t, f, t]), ("c", &[t, f, f])],
        );
        assert_eq!(s.pick("a", &[], &[]), Some(1));
        assert_eq!(s.pick("a", &[], &[]), Some(2));
        assert_eq!(s.pick("a", &[], &[]), Some(0));
    }

    #[test]
    fn chunks_readers_wait_for_go_first_in_their_order() {
        let t = true;
        let f = false;
        let mut s = sched(&[f, f, t, f], &[("a", &[t, t, t, t]), ("b", &[t, f, t, t])]);
        assert_eq!(s.pick("a", &[], &[2, 3, 1]), Some(3), "2 is held");
        assert_eq!(
            s.pick("b", &[], &[3, 1, 0]),
            Some(0),
            "3 is asked, b lacks 1"
        );
        assert_eq!(s.pick("a", &[3], &[3, 0]), Some(1), "then the rarest");
    }

    #[test]
    fn endgame_duplicates_only_overdue_requests_when_nothing_else_is_left() {
        let t = true;
        let f = false;
        let mut s = sched(&[t, f, f], &[("a", &[t, t, f]), ("b", &[t, t, t])]);
        let mine_a = [1u32];
        assert_eq!(s.pick("a", &[], &[]), Some(1));
        // Chunk 2 is still unrequested (b has it): a must not duplicate anything yet.
        assert_eq!(s.pick("a", &mine_a, &[]), None);
        assert_eq!(s.pick("b", &[], &[]), Some(2));
        let mine_b = [2u32];
        // Everything missing is in flight, but nothing is overdue: no duplicate yet.
        assert!(s.endgame());
        assert_eq!(s.pick("b", &mine_b, &[]), None);
        assert!(!s.has_work("b", Instant::now()));
        // Once chunk 1's request is overdue, b may duplicate it; a may never repeat itself.
        s.typical_secs = 0.1;
        s.requested_at[1] = Some(Instant::now() - Duration::from_secs(1));
        assert!(s.has_work("b", Instant::now()));
        assert_eq!(s.pick("a", &mine_a, &[]), None);
        assert_eq!(s.pick("b", &mine_b, &[]), Some(1));
        assert_eq!(s.pick("b", &[2, 1], &[]), None);
        s.settle(1);
        s.settle(1);
        assert_eq!(s.requested_at[1], None);
    }

    proptest! {
        #[test]
        fn picks_respect_what_is_held_and_requested(
            have in proptest::collection::vec(any::<bool>(), 1..64),
            holder in proptest::collection::vec(any::<bool>(), 64),
            rounds in 1usize..80,
        ) {
            let n = have.len();
            let mut s = sched(&have, &[("h", &holder[..n]), ("g", &vec![true; n])]);
            let mut seen = std::collections::HashMap::new();
            let mine: [u32; 0] = [];
            for _ in 0..rounds {
                let Some(i) = s.pick("h", &mine, &[]) else { break };
                let i = i as usize;
                prop_assert!(!have[i], "picked a chunk already held");
                prop_assert!(holder[i], "picked a chunk the holder lacks");
                *seen.entry(i).or_insert(0u8) += 1;
                prop_assert!(seen[&i] <= MAX_REQUESTS_PER_CHUNK);
            }
        }
    }
}
