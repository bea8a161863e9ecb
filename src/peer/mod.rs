//! The peer: a chunk [`store`] on disk, a chunk [`server`], a [`download`] engine whose
//! in-flight [`transfers`] readers can join, a [`tracker_client`], the [`catalogue`] that follows
//! the data dir, the local HTTP [`api`] (with rates from [`meter`]), and the front ends in [`cli`]
//! (the numbered menu, one-shot commands and the daemon). This module holds what they share:
//! the running peer and its tracker session.

pub mod api;
pub mod catalogue;
pub mod cli;
pub mod download;
pub mod meter;
pub mod server;
pub mod store;
pub mod tracker_client;
pub mod transfers;

use crate::bitfield::WireBits;
use crate::config::PeerConfig;
use crate::metrics::{serve_http, PeerMetrics, Ready};
use crate::protocol::{
    Acknowledged, ChunkRegister, ErrorCode, FileOffer, Hash, Msg, PeerAuth, Register, Registered,
    Withdraw,
};
use anyhow::Context;
use meter::Meter;
use server::RateLimiter;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Store, StoredFile};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracker_client::{TrackerClient, TrackerError};
use transfers::Transfers;

/// Chunk registrations waiting to be sent; when full, the next sync re-registers everything.
const REPORT_QUEUE: usize = 8192;
/// Encoded offers per register request, kept well under the tracker's frame cap.
const REGISTER_BATCH_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug)]
struct Session {
    peer_id: u64,
    token: String,
    /// The address this peer registered as reachable at.
    advertised: String,
}

/// A running peer. Cheap to share (`Arc<Peer>`); every task holds one.
pub struct Peer {
    pub cfg: PeerConfig,
    pub name: String,
    pub store: Store,
    pub tracker: TrackerClient,
    pub metrics: PeerMetrics,
    /// Holders that served bad data, kept across download attempts.
    pub bans: download::Bans,
    pub ready: Ready,
    pub upload: RateLimiter,
    /// Chunks sent at once; further requests wait their turn (first come, first served).
    pub upload_slots: tokio::sync::Semaphore,
    pub listen_addr: SocketAddr,
    pub stop: CancellationToken,
    pub tasks: TaskTracker,
    session: Mutex<Option<Session>>,
    announce_ms: AtomicU64,
    /// Set when the tracker may have missed something; the maintenance loop re-registers.
    needs_sync: AtomicBool,
    reports: mpsc::Sender<Report>,
    /// Wakes the catalogue: a file was found changed on disk while being served.
    pub rescan: tokio::sync::Notify,
    /// Downloads in flight, which API readers and other callers join.
    pub transfers: Transfers,
    /// Bytes of verified chunks landed, for the recent download rate.
    pub down: Meter,
    /// Chunk bytes sent to other peers, for the recent upload rate.
    pub up: Meter,
}

/// "I now hold chunk `.2` of version `.1` of file `.0`", queued for the tracker.
type Report = (String, Hash, u32);

/// Which files a starting peer shares.
pub enum Shares {
    /// These paths (the seed's command line); downloads still land in the data dir.
    Paths(Vec<PathBuf>),
    /// Everything in the data dir, resuming partial downloads (daemon mode).
    DataDir,
}

impl Peer {
    /// Loads the store, binds the chunk server (and metrics), registers, and starts the
    /// background tasks. Tracker trouble is not fatal: the maintenance loop keeps retrying.
    pub async fn start(
        cfg: PeerConfig,
        shares: Shares,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Peer>> {
        let name = cfg.name.clone().unwrap_or_else(host_name);
        let store = Store::new(&cfg.data_dir, cfg.direct_writes)?;
        let chunk_size = cfg.chunk_size;
        let store = tokio::task::spawn_blocking(move || -> anyhow::Result<Store> {
            match shares {
                Shares::DataDir => {
                    for (file, e) in store.scan(chunk_size) {
                        tracing::warn!(file, error = format!("{e:#}"), "not shared");
                    }
                }
                Shares::Paths(paths) => {
                    for p in paths {
                        store.share(&p, chunk_size)?;
                    }
                }
            }
            Ok(store)
        })
        .await??;
        let listener = crate::connection::listen(&cfg.listen, cfg.max_connections)
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let listen_addr = listener.local_addr()?;
        let tracker = TrackerClient::new(&cfg);
        let (reports, report_rx) = mpsc::channel(REPORT_QUEUE);
        let peer = Arc::new(Peer {
            name,
            store,
            tracker,
            metrics: PeerMetrics::default(),
            bans: download::Bans::default(),
            ready: Ready::default(),
            upload: RateLimiter::new(cfg.upload_limit),
            upload_slots: tokio::sync::Semaphore::new(cfg.upload_slots),
            listen_addr,
            stop,
            tasks: TaskTracker::new(),
            session: Mutex::new(None),
            announce_ms: AtomicU64::new(30_000),
            needs_sync: AtomicBool::new(true),
            reports,
            rescan: tokio::sync::Notify::new(),
            transfers: Transfers::default(),
            down: Meter::default(),
            up: Meter::default(),
            cfg,
        });
        peer.update_file_gauges();
        let mut metrics_addr = None;
        if let Some(http) = bind_http(&peer.cfg.metrics_addr, "metrics").await? {
            metrics_addr = Some(http.local_addr()?);
            peer.tasks.spawn(serve_http(
                http,
                peer.metrics.registry.clone(),
                peer.ready.clone(),
                peer.stop.clone(),
            ));
        }
        let mut api_addr = None;
        if let Some(http) = bind_http(&peer.cfg.api_addr, "the HTTP API").await? {
            api_addr = Some(http.local_addr()?);
            peer.tasks.spawn(api::serve(peer.clone(), http));
        }
        tracing::info!(addr = %listen_addr, metrics = metrics_addr.map(tracing::field::display), api = api_addr.map(tracing::field::display), peer = %peer.name, files = peer.store.all().len(), "peer listening");
        peer.tasks.spawn(server::run(peer.clone(), listener));
        match peer.sync().await {
            // Unreachable: the tracker client has said so, once.
            Err(e) if e.code().is_none() => tracing::debug!(error = %e, "not registered yet"),
            Err(e) => tracing::warn!(error = %e, "not registered with the tracker yet"),
            Ok(_) => {}
        }
        peer.tasks.spawn(peer.clone().maintain(report_rx));
        Ok(peer)
    }

    fn session(&self) -> Option<Session> {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_session(&self, s: Option<Session>) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Whether the tracker knows this peer now.
    pub fn is_registered(&self) -> bool {
        self.session().is_some() && self.ready.get()
    }

    pub fn peer_id(&self) -> Option<u64> {
        self.session().map(|s| s.peer_id)
    }

    /// The address other peers should dial.
    async fn advertised(&self) -> Result<String, TrackerError> {
        if let Some(a) = &self.cfg.advertise {
            return Ok(a.clone());
        }
        let ip = if self.listen_addr.ip().is_unspecified() {
            self.tracker.local_ip().await?
        } else {
            self.listen_addr.ip()
        };
        Ok(SocketAddr::new(ip, self.listen_addr.port()).to_string())
    }

    /// Tells the tracker everything this peer holds: a fresh registration if it has no session
    /// (or the tracker forgot it), otherwise an idempotent re-offer under the existing one.
    pub async fn sync(&self) -> Result<Vec<Registered>, TrackerError> {
        self.needs_sync.store(false, Ordering::SeqCst);
        let result = self.register_offers().await;
        if result.is_err() {
            self.needs_sync.store(true, Ordering::SeqCst);
        }
        self.ready.set(result.is_ok());
        result
    }

    async fn register_offers(&self) -> Result<Vec<Registered>, TrackerError> {
        let offers: Vec<FileOffer> = self.store.all().iter().filter_map(|f| offer(f)).collect();
        let batches = batch_offers(offers);
        let addr = self.advertised().await?;
        let mut replies = Vec::new();
        for files in batches {
            let session = self.session();
            let req = Register {
                name: self.name.clone(),
                addr: addr.clone(),
                secret: self.cfg.secret.clone(),
                peer_id: session.as_ref().map(|s| s.peer_id),
                token: session.map(|s| s.token),
                files,
            };
            let reply: Registered = match self.tracker.request(Msg::Register, &req).await {
                Err(e) if forgotten(&e) => {
                    tracing::info!("tracker forgot this peer; registering afresh");
                    self.set_session(None);
                    return Box::pin(self.register_offers()).await;
                }
                other => other?,
            };
            for v in reply.files.iter().filter(|v| !v.accepted) {
                tracing::warn!(file = %v.name, code = v.error.map(|c| c.as_str()), reason = v.message.as_deref(), "tracker refused file");
            }
            self.set_announce_interval(reply.announce_interval_ms);
            self.set_session(Some(Session {
                peer_id: reply.peer_id,
                token: reply.token.clone(),
                advertised: addr.clone(),
            }));
            replies.push(reply);
        }
        if let Some(r) = replies.first() {
            tracing::info!(peer_id = r.peer_id, addr = %r.addr, files = replies.iter().map(|r| r.files.len()).sum::<usize>(), tracker = %self.tracker.addr(), "registered with tracker");
        }
        Ok(replies)
    }

    /// Adopts the tracker's announce interval, which also caps the backoff while it is away.
    fn set_announce_interval(&self, ms: u64) {
        let ms = ms.max(100);
        self.announce_ms.store(ms, Ordering::Relaxed);
        self.tracker.cap_backoff(Duration::from_millis(ms));
    }

    /// Queues "I now hold chunk `index` of `file`" for the tracker (sent in batches).
    pub fn report_chunk(&self, file: &StoredFile, index: u32) {
        let report = (file.info.name.clone(), file.info.digest, index);
        if self.reports.try_send(report).is_err() {
            self.needs_sync.store(true, Ordering::SeqCst);
        }
    }

    /// Sends 4 chunk register for `chunks` of version `digest` of `file`; returns how many were
    /// new to the tracker.
    pub async fn register_chunks(
        &self,
        file: &str,
        digest: Hash,
        chunks: Vec<u32>,
    ) -> Result<u64, TrackerError> {
        let Some(s) = self.session() else {
            self.sync().await?;
            return Ok(0);
        };
        let req = ChunkRegister {
            peer_id: s.peer_id,
            token: s.token,
            file: file.to_string(),
            digest: Some(digest),
            chunks,
        };
        let reply: crate::protocol::ChunksRecorded =
            self.tracker.request(Msg::ChunkRegister, &req).await?;
        Ok(reply.recorded)
    }

    /// Background upkeep: batched chunk registrations, lease renewal, re-registration.
    async fn maintain(self: Arc<Self>, mut reports: mpsc::Receiver<Report>) {
        let mut last_announce = tokio::time::Instant::now();
        loop {
            let tick = Duration::from_millis(self.announce_ms.load(Ordering::Relaxed))
                .min(Duration::from_secs(1));
            let first = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = reports.recv() => r,
                _ = tokio::time::sleep(tick) => None,
            };
            if let Some(first) = first {
                self.flush_reports(first, &mut reports).await;
            }
            if self.needs_sync.load(Ordering::SeqCst) || self.session().is_none() {
                if self.sync().await.is_ok() {
                    last_announce = tokio::time::Instant::now();
                }
                continue;
            }
            let interval = Duration::from_millis(self.announce_ms.load(Ordering::Relaxed));
            if last_announce.elapsed() >= interval {
                last_announce = tokio::time::Instant::now();
                self.announce().await;
            }
        }
    }

    /// Sends the queued chunk reports, one request per file version. While the tracker is away
    /// they are not sent one by one: the re-registration when it is back carries every chunk
    /// held, in a few large batches.
    async fn flush_reports(&self, first: Report, reports: &mut mpsc::Receiver<Report>) {
        let mut by_file: BTreeMap<(String, Hash), Vec<u32>> = BTreeMap::new();
        let mut next = Some(first);
        while let Some((file, digest, index)) = next {
            by_file.entry((file, digest)).or_default().push(index);
            next = reports.try_recv().ok();
        }
        while let Some(((file, digest), chunks)) = by_file.pop_first() {
            if self.tracker.is_down() {
                by_file.insert((file, digest), chunks);
                break;
            }
            match self.register_chunks(&file, digest, chunks.clone()).await {
                Ok(_) => {}
                Err(e) if forgotten(&e) => {
                    tracing::debug!(error = %e, "chunk registration refused; registering again");
                    self.set_session(None);
                    by_file.insert((file, digest), chunks);
                    break;
                }
                // Unreachable: the tracker client has said so, once.
                Err(e) if e.code().is_none() => {
                    tracing::debug!(file = %file, error = %e, "chunk registration failed");
                    by_file.insert((file, digest), chunks);
                    break;
                }
                Err(e) => tracing::warn!(file = %file, error = %e, "chunk registration refused"),
            }
        }
        if !by_file.is_empty() {
            let held: usize = by_file.values().map(Vec::len).sum();
            self.tracker.note_held_back(held as u64);
            self.needs_sync.store(true, Ordering::SeqCst);
        }
    }

    async fn announce(&self) {
        let Some(s) = self.session() else { return };
        // A container that reconnects may come back with another address: tell the tracker
        // now rather than let others dial the old one until the lease runs out.
        if let Ok(now) = self.advertised().await {
            if now != s.advertised {
                tracing::info!(old = %s.advertised, new = %now, "advertised address changed; registering it");
                self.needs_sync.store(true, Ordering::SeqCst);
                return;
            }
        }
        let auth = PeerAuth {
            peer_id: s.peer_id,
            token: s.token,
        };
        match self
            .tracker
            .request::<_, Acknowledged>(Msg::Announce, &auth)
            .await
        {
            Ok(ack) => {
                if let Some(ms) = ack.announce_interval_ms {
                    self.set_announce_interval(ms);
                }
            }
            Err(e) if forgotten(&e) => {
                tracing::info!(error = %e, "announce refused; registering again");
                self.set_session(None);
                self.needs_sync.store(true, Ordering::SeqCst);
            }
            // Unreachable or busy: keep the identity and try again next interval.
            Err(e) => {
                self.ready.set(false);
                if e.code().is_some() {
                    tracing::warn!(error = %e, "announce refused");
                }
            }
        }
    }

    /// Stops offering this version of a file: it is served no more, and the tracker stops
    /// listing this peer as its holder (message 8). Without a session there is nothing to tell:
    /// the next registration simply leaves it out.
    pub async fn withdraw(&self, file: &StoredFile) {
        if !self.store.remove(file) {
            return;
        }
        self.metrics.files_withdrawn.inc();
        self.update_file_gauges();
        tracing::info!(file = %file.info.name, digest = %file.info.digest.to_hex(), "withdrawn");
        let Some(s) = self.session() else { return };
        let req = Withdraw {
            peer_id: s.peer_id,
            token: s.token,
            file: file.info.name.clone(),
            digest: file.info.digest,
        };
        if let Err(e) = self
            .tracker
            .request::<_, Acknowledged>(Msg::Withdraw, &req)
            .await
        {
            tracing::warn!(file = %file.info.name, error = %e, "the tracker did not hear the withdrawal; it lists this peer until its lease ends");
        }
    }

    /// After `new` replaced the file under its name: withdraws the versions whose bytes sat at
    /// that path, which the rename did away with.
    pub async fn retire_replaced(&self, new: &StoredFile) {
        let Some((path, _)) = new.on_disk() else {
            return;
        };
        for old in self.store.versions(&new.info.name) {
            let replaced = old.on_disk().is_some_and(|(p, _)| p == path);
            if replaced && !std::ptr::eq(old.as_ref(), new) {
                self.withdraw(&old).await;
            }
        }
    }

    /// Tells the tracker this peer leaves (bounded by the request timeout). Best effort.
    pub async fn leave(&self) {
        let Some(s) = self.session() else { return };
        let auth = PeerAuth {
            peer_id: s.peer_id,
            token: s.token,
        };
        let limit = self.cfg.request_timeout.min(Duration::from_secs(2));
        match tokio::time::timeout(
            limit,
            self.tracker.request::<_, Acknowledged>(Msg::Leave, &auth),
        )
        .await
        {
            Ok(Ok(_)) => tracing::info!(peer_id = auth.peer_id, "left the swarm"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leave failed"),
            Err(_) => tracing::warn!("leave timed out"),
        }
        self.set_session(None);
        self.ready.set(false);
    }

    /// Leaves, stops every task, and waits for them (bounded).
    pub async fn shutdown(&self) {
        self.leave().await;
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(2), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 2s");
        }
    }

    pub fn update_file_gauges(&self) {
        self.metrics
            .files_shared
            .set(self.store.complete_count() as i64);
    }
}

/// Binds the HTTP listener for `what` if its address is set.
async fn bind_http(addr: &Option<String>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))?;
    Ok(Some(listener))
}

/// Whether the tracker no longer knows this identity (it restarted, expired us, or the id now
/// belongs to someone else): the cure is a fresh registration.
fn forgotten(e: &TrackerError) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::UnknownPeer | ErrorCode::Forbidden)
    )
}

/// The registration entry for one held file; `None` when it holds no chunk yet.
fn offer(f: &StoredFile) -> Option<FileOffer> {
    let have = f.have();
    if have.count() == 0 && !have.is_empty() {
        return None;
    }
    let have = (!have.is_full()).then(|| WireBits::from(&have));
    Some(FileOffer {
        info: f.info.clone(),
        published: f.published,
        hashes: (*f.hashes).clone(),
        have,
    })
}

/// Splits offers so no register request grows past [`REGISTER_BATCH_BYTES`]; always at least
/// one (possibly empty) batch, so a peer with no files still registers.
fn batch_offers(offers: Vec<FileOffer>) -> Vec<Vec<FileOffer>> {
    let mut batches = vec![Vec::new()];
    let mut size = 0;
    for o in offers {
        let len = o.hashes.0.len() * 44 + 256;
        if size + len > REGISTER_BATCH_BYTES && !batches.last().expect("non-empty").is_empty() {
            batches.push(Vec::new());
            size = 0;
        }
        size += len;
        batches.last_mut().expect("non-empty").push(o);
    }
    batches
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "shoal-peer".into())
}
