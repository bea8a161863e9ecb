//! Keeping every tracker's view of this peer true: one upkeep task per tracker registers the
//! files that tracker owns, sends it their chunk reports in batches, renews the lease, and
//! re-registers when the tracker forgot this peer or files changed owners. One tracker's
//! trouble never holds up another's task.

use super::store::StoredFile;
use super::tracker_client::TrackerError;
use super::trackers::{Member, Report, Session};
use super::Peer;
use crate::bitfield::WireBits;
use crate::protocol::{
    Acknowledged, ChunkRegister, ChunksRecorded, ErrorCode, FileOffer, Hash, Msg, PeerAuth,
    Register, Registered, Withdraw,
};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Encoded offers per register request, kept well under the tracker's frame cap.
const REGISTER_BATCH_BYTES: usize = 1024 * 1024;

impl Peer {
    /// Registers with every tracker at once (each bounded by its timeouts), then starts the
    /// upkeep of each and follows the tracker set.
    pub(super) async fn join_trackers(self: &Arc<Self>) {
        let mut first = JoinSet::new();
        for m in self.trackers.members() {
            let peer = self.clone();
            first.spawn(async move {
                match peer.sync_with(&m).await {
                    // Unreachable: the tracker client has said so, once.
                    Err(e) if e.code().is_none() => {
                        tracing::debug!(error = %e, "not registered yet")
                    }
                    Err(e) => tracing::warn!(error = %e, "not registered with the tracker yet"),
                    Ok(_) => {}
                }
                m
            });
        }
        while let Some(done) = first.join_next().await {
            if let Ok(m) = done {
                self.tasks.spawn(self.clone().upkeep(m));
            }
        }
        let peer = self.clone();
        self.tasks.spawn(async move {
            let starter = peer.clone();
            peer.trackers
                .follow(move |m| {
                    starter.tasks.spawn(starter.clone().upkeep(m));
                })
                .await
        });
    }

    /// Tells every tracker everything of this peer's it owns; the replies of those that
    /// answered. Fails when none answered.
    pub async fn sync(&self) -> Result<Vec<Registered>, TrackerError> {
        let mut replies = Vec::new();
        let mut failure = None;
        for m in self.trackers.members() {
            match self.sync_with(&m).await {
                Ok(r) => replies.extend(r),
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(e) if replies.is_empty() => Err(e),
            _ => Ok(replies),
        }
    }

    /// Has every tracker's upkeep re-register this peer's files on its next round.
    pub fn resync_later(&self) {
        for m in self.trackers.members() {
            m.needs_sync.store(true, Ordering::SeqCst);
        }
    }

    /// Tells tracker `m` the files it owns: a fresh registration if it has no session for this
    /// peer (or forgot it), otherwise an idempotent re-offer under the existing one.
    pub(crate) async fn sync_with(&self, m: &Member) -> Result<Vec<Registered>, TrackerError> {
        m.needs_sync.store(false, Ordering::SeqCst);
        let result = self.register_offers(m).await;
        if result.is_err() {
            m.needs_sync.store(true, Ordering::SeqCst);
        }
        self.ready.set(self.trackers.registered());
        result
    }

    async fn register_offers(&self, m: &Member) -> Result<Vec<Registered>, TrackerError> {
        let offers: Vec<FileOffer> = self
            .store
            .all()
            .iter()
            .filter(|f| self.trackers.is_owner(m, &f.info.name))
            .filter_map(|f| offer(f))
            .collect();
        let owned = offers
            .iter()
            .map(|o| (o.info.name.clone(), o.info.digest))
            .collect();
        let batches = batch_offers(offers);
        let addr = self.advertised().await?;
        let mut replies = Vec::new();
        for files in batches {
            let session = m.session();
            let req = Register {
                name: self.name.clone(),
                addr: addr.clone(),
                secret: self.cfg.secret.clone(),
                peer_id: session.as_ref().map(|s| s.peer_id),
                token: session.map(|s| s.token),
                files,
            };
            let reply: Registered = match m.client.request(Msg::Register, &req).await {
                Err(e) if forgotten(&e) => {
                    tracing::info!(tracker = %m.addr(), "tracker forgot this peer; registering afresh");
                    m.set_session(None);
                    return Box::pin(self.register_offers(m)).await;
                }
                other => other?,
            };
            for v in reply.files.iter().filter(|v| !v.accepted) {
                tracing::warn!(tracker = %m.addr(), file = %v.name, code = v.error.map(|c| c.as_str()), reason = v.message.as_deref(), "tracker refused file");
            }
            m.set_announce_interval(reply.announce_interval_ms);
            m.set_session(Some(Session {
                peer_id: reply.peer_id,
                token: reply.token.clone(),
                advertised: addr.clone(),
            }));
            replies.push(reply);
        }
        if let Some(r) = replies.first() {
            tracing::info!(peer_id = r.peer_id, addr = %r.addr, files = replies.iter().map(|r| r.files.len()).sum::<usize>(), tracker = %m.addr(), "registered with tracker");
        }
        for (file, digest) in m.replace_placed(owned) {
            // Best effort: otherwise the entry lasts until this peer leaves.
            match self.withdraw_from(m, &file, digest).await {
                Ok(()) => tracing::debug!(tracker = %m.addr(), file, "moved to its new owners"),
                Err(e) => {
                    tracing::debug!(tracker = %m.addr(), file, error = %e, "former owner not told")
                }
            }
        }
        Ok(replies)
    }

    /// Sends 8 withdraw for version `digest` of `file` to tracker `m`: it stops listing this
    /// peer as a holder.
    async fn withdraw_from(
        &self,
        m: &Member,
        file: &str,
        digest: Hash,
    ) -> Result<(), TrackerError> {
        m.forget_placed(file, digest);
        let Some(s) = m.session() else { return Ok(()) };
        let req = Withdraw {
            peer_id: s.peer_id,
            token: s.token,
            file: file.to_string(),
            digest,
        };
        m.client
            .request::<_, Acknowledged>(Msg::Withdraw, &req)
            .await
            .map(|_| ())
    }

    /// Queues "I now hold chunk `index` of `file`" for the file's owners (sent in batches).
    pub fn report_chunk(&self, file: &StoredFile, index: u32) {
        for m in self.trackers.owners(&file.info.name) {
            m.report((file.info.name.clone(), file.info.digest, index));
        }
    }

    /// Sends 4 chunk register for `chunks` of version `digest` of `file` to its owners; returns
    /// how many were new to the first owner that answered.
    pub async fn register_chunks(
        &self,
        file: &str,
        digest: Hash,
        chunks: Vec<u32>,
    ) -> Result<u64, TrackerError> {
        let mut recorded = None;
        let mut failure = None;
        for m in self.trackers.owners(file) {
            match self
                .register_chunks_with(&m, file, digest, chunks.clone())
                .await
            {
                Ok(n) => recorded = Some(recorded.unwrap_or(n)),
                Err(e) => failure = Some(e),
            }
        }
        match (recorded, failure) {
            (Some(n), _) => Ok(n),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(0),
        }
    }

    async fn register_chunks_with(
        &self,
        m: &Member,
        file: &str,
        digest: Hash,
        chunks: Vec<u32>,
    ) -> Result<u64, TrackerError> {
        let Some(s) = m.session() else {
            self.sync_with(m).await?;
            return Ok(0);
        };
        let req = ChunkRegister {
            peer_id: s.peer_id,
            token: s.token,
            file: file.to_string(),
            digest: Some(digest),
            chunks,
        };
        let reply: ChunksRecorded = m.client.request(Msg::ChunkRegister, &req).await?;
        m.note_placed(file, digest);
        Ok(reply.recorded)
    }

    /// One tracker's upkeep: batched chunk registrations, lease renewal, re-registration when
    /// it forgot this peer or files changed owners. Ends when the tracker leaves the set.
    async fn upkeep(self: Arc<Self>, m: Arc<Member>) {
        let Some(mut reports) = m.take_reports() else {
            return;
        };
        let mut last_announce = tokio::time::Instant::now();
        let mut owners_as_of = self.trackers.epoch();
        loop {
            let tick = m.announce_interval().min(Duration::from_secs(1));
            let first = tokio::select! {
                _ = m.gone.cancelled() => return,
                r = reports.recv() => r,
                _ = tokio::time::sleep(tick) => None,
            };
            if let Some(first) = first {
                self.flush_reports(&m, first, &mut reports).await;
            }
            let epoch = self.trackers.epoch();
            if epoch != owners_as_of {
                // A tracker joined, left, went down or came back: some files have new owners.
                owners_as_of = epoch;
                m.needs_sync.store(true, Ordering::SeqCst);
            }
            if m.needs_sync.load(Ordering::SeqCst) || m.session().is_none() {
                if self.sync_with(&m).await.is_ok() {
                    last_announce = tokio::time::Instant::now();
                }
                continue;
            }
            if last_announce.elapsed() >= m.announce_interval() {
                last_announce = tokio::time::Instant::now();
                self.announce(&m).await;
            }
        }
    }

    /// Sends the queued chunk reports, one request per file version. While the tracker is away
    /// they are not sent one by one: the re-registration when it is back carries every chunk
    /// held, in a few large batches.
    async fn flush_reports(&self, m: &Member, first: Report, reports: &mut mpsc::Receiver<Report>) {
        let mut by_file: BTreeMap<(String, Hash), Vec<u32>> = BTreeMap::new();
        let mut next = Some(first);
        while let Some((file, digest, index)) = next {
            by_file.entry((file, digest)).or_default().push(index);
            next = reports.try_recv().ok();
        }
        while let Some(((file, digest), chunks)) = by_file.pop_first() {
            if m.client.is_down() {
                by_file.insert((file, digest), chunks);
                break;
            }
            match self
                .register_chunks_with(m, &file, digest, chunks.clone())
                .await
            {
                Ok(_) => {}
                Err(e) if forgotten(&e) => {
                    tracing::debug!(tracker = %m.addr(), error = %e, "chunk registration refused; registering again");
                    m.set_session(None);
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
            m.client.note_held_back(held as u64);
            m.needs_sync.store(true, Ordering::SeqCst);
        }
    }

    async fn announce(&self, m: &Member) {
        let Some(s) = m.session() else { return };
        // A container that reconnects may come back with another address: tell the tracker
        // now rather than let others dial the old one until the lease runs out.
        if let Ok(now) = self.advertised().await {
            if now != s.advertised {
                tracing::info!(old = %s.advertised, new = %now, "advertised address changed; registering it");
                m.needs_sync.store(true, Ordering::SeqCst);
                return;
            }
        }
        let auth = PeerAuth {
            peer_id: s.peer_id,
            token: s.token,
        };
        match m
            .client
            .request::<_, Acknowledged>(Msg::Announce, &auth)
            .await
        {
            Ok(ack) => {
                if let Some(ms) = ack.announce_interval_ms {
                    m.set_announce_interval(ms);
                }
            }
            Err(e) if forgotten(&e) => {
                tracing::info!(tracker = %m.addr(), error = %e, "announce refused; registering again");
                m.set_session(None);
                m.needs_sync.store(true, Ordering::SeqCst);
            }
            // Unreachable or busy: keep the identity and try again next interval.
            Err(e) => {
                if e.code().is_some() {
                    tracing::warn!(error = %e, "announce refused");
                }
            }
        }
        self.ready.set(self.trackers.registered());
    }

    /// Stops offering this version of a file: it is served no more, and the trackers stop
    /// listing this peer as its holder (message 8). Every tracker holding a session hears it,
    /// not only today's owners: a former owner may still list the file. Without a session there
    /// is nothing to tell: the next registration simply leaves it out.
    pub async fn withdraw(&self, file: &StoredFile) {
        if !self.store.remove(file) {
            return;
        }
        self.metrics.files_withdrawn.inc();
        self.update_file_gauges();
        tracing::info!(file = %file.info.name, digest = %file.info.digest.to_hex(), "withdrawn");
        for m in self.trackers.members() {
            if m.session().is_none() {
                continue;
            }
            let result = self
                .withdraw_from(&m, &file.info.name, file.info.digest)
                .await;
            match result {
                Err(e) if self.trackers.is_owner(&m, &file.info.name) => {
                    tracing::warn!(file = %file.info.name, error = %e, "the tracker did not hear the withdrawal; it lists this peer until its lease ends")
                }
                Err(e) => {
                    tracing::debug!(tracker = %m.addr(), file = %file.info.name, error = %e, "a tracker that does not own the file did not hear its withdrawal")
                }
                Ok(()) => {}
            }
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

    /// Tells every tracker this peer leaves (bounded by the request timeout). Best effort.
    pub async fn leave(&self) {
        let limit = self.cfg.request_timeout.min(Duration::from_secs(2));
        let mut told = JoinSet::new();
        for m in self.trackers.members() {
            let Some(s) = m.session() else { continue };
            let auth = PeerAuth {
                peer_id: s.peer_id,
                token: s.token,
            };
            told.spawn(async move {
                let request = m.client.request::<_, Acknowledged>(Msg::Leave, &auth);
                let result = tokio::time::timeout(limit, request).await;
                m.set_session(None);
                (auth.peer_id, m, result)
            });
        }
        while let Some(Ok((peer_id, m, result))) = told.join_next().await {
            match result {
                Ok(Ok(_)) => tracing::info!(peer_id, tracker = %m.addr(), "left the swarm"),
                Ok(Err(e)) => tracing::warn!(error = %e, "leave failed"),
                Err(_) => tracing::warn!(tracker = %m.addr(), "leave timed out"),
            }
        }
        self.ready.set(false);
    }
}

/// Whether the tracker no longer knows this identity (it restarted, expired us, or the id now
/// belongs to someone else): the cure is a fresh registration.
pub(crate) fn forgotten(e: &TrackerError) -> bool {
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
