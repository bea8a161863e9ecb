//! One pull of a file from the origin, until the tracker knows every chunk hash: the loop that
//! sends message 9, fetches the granted chunks from the origin and the offered ones from other
//! pulling peers (checked against their published hash), and publishes each chunk it lands.

use super::http::{self, Remote, Source};
use super::part::PullPart;
use super::{retried, Origin, Pulled, ATTEMPTS};
use crate::peer::download::DownloadError;
use crate::peer::transfers::Transfer;
use crate::peer::upkeep::forgotten;
use crate::peer::Peer;
use crate::protocol::{
    decode_reply, encode_request, ChunkHash, ChunkHeader, ChunkRequest, ChunkSource, Hash, Msg,
    OriginClaim, OriginGrant,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How often a pulling peer renews its claims and asks for news while it waits.
const POLL: Duration = Duration::from_millis(200);
/// Times one pull registers this peer again (the tracker restarted) before it gives up.
const MAX_REGISTRATIONS: u32 = 5;
/// Chunks fetched from other pulling peers at once.
const PEER_FETCHES: usize = 4;

pub(super) struct Job {
    pub peer: Arc<Peer>,
    pub origin: Arc<Origin>,
    pub source: Source,
    pub name: String,
    pub remote: Remote,
    /// The stamp proposed for the version (see [`OriginClaim::published`]).
    pub published: u64,
    pub part: Arc<PullPart>,
    /// The pull's readers learn from it when the shape is settled and each chunk lands.
    pub transfer: Arc<Transfer>,
    /// The tracker asked last (its address). Held briefly, never across an await.
    pub tracker: Mutex<Option<String>>,
}

/// A fetched chunk and its hash, or `None` when a peer failed to send it (it is offered again
/// later).
type Landed = Result<(u32, Option<Hash>), DownloadError>;

impl Job {
    pub async fn run(self: &Arc<Self>) -> Result<Pulled, DownloadError> {
        let cfg = &self.peer.cfg;
        let mut outbox: Vec<ChunkHash> = Vec::new();
        let mut from_origin: JoinSet<Landed> = JoinSet::new();
        let mut from_peers: JoinSet<Landed> = JoinSet::new();
        // Chunks being fetched, from either side: never asked twice at once.
        let mut busy: HashSet<u32> = HashSet::new();
        // Nothing new (from here or the swarm) for this long ends the pull: every claim has a
        // lease and every request a timeout, so a healthy swarm always makes progress.
        let patience = cfg.origin_timeout * (ATTEMPTS + 1) + Duration::from_secs(30);
        let (mut known, mut progressed) = (0, Instant::now());
        let mut registrations = 0;
        loop {
            let want = cfg.origin_concurrency.saturating_sub(from_origin.len()) as u32;
            let fetch = PEER_FETCHES.saturating_sub(from_peers.len()) as u32;
            let hashes = std::mem::take(&mut outbox);
            let Some(grant) = self.claim(hashes, want, fetch, false).await? else {
                // Another tracker, or one that forgot this peer (a restart): publish everything
                // held again.
                registrations += 1;
                if registrations > MAX_REGISTRATIONS {
                    return Err(DownloadError::Local(anyhow::anyhow!(
                        "the tracker forgot this peer {MAX_REGISTRATIONS} times during the pull of {:?}",
                        self.name
                    )));
                }
                outbox = self
                    .part
                    .held()
                    .into_iter()
                    .map(|(index, hash)| ChunkHash { index, hash })
                    .collect();
                continue;
            };
            self.part.set_chunk_size(grant.chunk_size);
            // The first reply settles the chunk size: readers can map bytes to chunks now.
            if self.transfer.shape().is_none() {
                self.transfer.pulling_into(self.part.clone());
            }
            for &index in &grant.refused {
                tracing::warn!(chunk = index, "the tracker holds another hash for this chunk; fetching it from the peers that have it");
                self.part.forget(index);
            }
            if let Some(digest) = grant.digest {
                from_origin.abort_all();
                from_peers.abort_all();
                return Ok(Pulled {
                    digest,
                    size: self.remote.size,
                    held: self.part.held().into_iter().map(|(i, _)| i).collect(),
                });
            }
            if grant.known > known || !grant.granted.is_empty() || !grant.sources.is_empty() {
                (known, progressed) = (grant.known, Instant::now());
            } else if progressed.elapsed() > patience {
                return Err(DownloadError::Local(anyhow::anyhow!(
                    "{:?}: no chunk arrived from the origin or other peers for {patience:?}",
                    self.name
                )));
            }
            for index in grant.granted {
                if busy.insert(index) {
                    from_origin.spawn(self.clone().fetch_from_origin(index));
                }
            }
            for source in grant.sources {
                if !self.part.holds(source.index) && busy.insert(source.index) {
                    from_peers.spawn(self.clone().fetch_from_peer(source));
                }
            }
            let landed = tokio::select! {
                _ = self.peer.stop.cancelled() => return Err(DownloadError::Stopped(self.name.clone())),
                Some(done) = from_origin.join_next(), if !from_origin.is_empty() => done,
                Some(done) = from_peers.join_next(), if !from_peers.is_empty() => done,
                _ = tokio::time::sleep(POLL) => continue,
            };
            let landed = landed.map_err(|e| DownloadError::Local(e.into()))?;
            let (index, hash) = landed?;
            busy.remove(&index);
            if let Some(hash) = hash {
                outbox.push(ChunkHash { index, hash });
            }
        }
    }

    /// Tells the tracker this peer gives the file up, so that the chunks it published (which
    /// it will not serve) are fetched from the origin again. Best effort: otherwise they are
    /// when this peer leaves.
    pub async fn abandon(&self) {
        if let Err(e) = self.claim(Vec::new(), 0, 0, true).await {
            tracing::debug!(error = %e, "could not tell the tracker this pull stopped");
        }
    }

    /// Sends message 9 to the tracker every puller of the name asks: the first live one in its
    /// rendezvous order. `None` when that is another tracker than last time, or it had
    /// forgotten this peer (which is registered again): the caller publishes its chunks again.
    async fn claim(
        &self,
        hashes: Vec<ChunkHash>,
        want: u32,
        fetch: u32,
        abandon: bool,
    ) -> Result<Option<OriginGrant>, DownloadError> {
        let peer = &self.peer;
        let ranking = peer.trackers.ranking(&self.name);
        let Some(m) = ranking.first() else {
            return Err(DownloadError::Local(anyhow::anyhow!(
                "no tracker is configured"
            )));
        };
        let last = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(m.addr().to_string());
        if last.is_some_and(|last| last != m.addr()) {
            tracing::info!(tracker = %m.addr(), "pulling through another tracker now");
            return Ok(None);
        }
        if m.session().is_none() {
            peer.sync_with(m).await?;
        }
        let Some(session) = m.session() else {
            return Ok(None);
        };
        let req = OriginClaim {
            peer_id: session.peer_id,
            token: session.token,
            file: self.name.clone(),
            size: self.remote.size,
            validator: self.remote.validator(),
            chunk_size: self.part.chunk_size(),
            published: self.published,
            hashes,
            want,
            fetch,
            abandon,
        };
        match m.client.request(Msg::Origin, &req).await {
            Err(e) if forgotten(&e) => {
                m.set_session(None);
                peer.sync_with(m).await?;
                Ok(None)
            }
            other => Ok(Some(other?)),
        }
    }

    /// Fetches one granted chunk from the origin (within this peer's origin slots), writes it
    /// at its offset in the hidden partial file and returns its hash.
    async fn fetch_from_origin(self: Arc<Self>, index: u32) -> Landed {
        let _slot = self.origin.slots.acquire().await.expect("never closed");
        let timeout = self.peer.cfg.origin_timeout;
        let span = self.part.span(index);
        let url = self.source.url();
        let data = retried(&self.peer, &url, || {
            http::range(&self.source, &self.remote, span, timeout)
        })
        .await?;
        self.peer.metrics.origin_bytes.inc_by(data.len() as u64);
        self.peer.count_fetched(&self.name, "upstream", data.len());
        let hash = Hash::of(&data);
        self.land(index, hash, data).await?;
        tracing::debug!(chunk = index, "chunk fetched from the origin");
        Ok((index, Some(hash)))
    }

    /// Fetches an offered chunk from another pulling peer and checks it against its published
    /// hash. A failure only costs this attempt: the chunk is offered again later.
    async fn fetch_from_peer(self: Arc<Self>, source: ChunkSource) -> Landed {
        let limit = self.peer.cfg.chunk_timeout;
        let asked = tokio::time::timeout(limit, self.ask_peer(&source)).await;
        let data = match asked {
            Ok(Ok(data)) => data,
            Ok(Err(why)) => {
                tracing::debug!(holder = %source.addr, chunk = source.index, reason = %why, "chunk not fetched from peer");
                return Ok((source.index, None));
            }
            Err(_) => {
                tracing::debug!(holder = %source.addr, chunk = source.index, "chunk from peer timed out");
                return Ok((source.index, None));
            }
        };
        let m = &self.peer.metrics;
        m.chunks_downloaded.inc();
        m.bytes_downloaded.inc_by(data.len() as u64);
        self.peer.count_fetched(&self.name, "peers", data.len());
        self.land(source.index, source.hash, data).await?;
        Ok((source.index, Some(source.hash)))
    }

    /// One chunk request (message 5 without a digest: the holder serves its pull of the name).
    async fn ask_peer(&self, source: &ChunkSource) -> Result<Vec<u8>, String> {
        let cfg = &self.peer.cfg;
        let mut conn = self.peer.dial_holder(&source.addr).await?;
        let req = ChunkRequest {
            file: self.name.clone(),
            index: source.index,
            digest: None,
            secret: cfg.secret.clone(),
            peer_id: self.peer.peer_id(),
        };
        let sent = conn
            .write_line(&encode_request(Msg::ChunkRequest, &req))
            .await;
        sent.and(conn.flush().await).map_err(|e| e.to_string())?;
        let line = conn
            .read_line()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("closed the connection")?;
        let header: ChunkHeader =
            decode_reply(Msg::ChunkRequest, &line).map_err(|r| r.to_string())?;
        let (_, len) = self.part.span(source.index);
        if header.index != source.index || header.length != len || header.hash != source.hash {
            return Err(format!("answered another chunk: {header:?}"));
        }
        let mut data = vec![0; len as usize];
        conn.read_raw(&mut data).await.map_err(|e| e.to_string())?;
        if Hash::of(&data) != source.hash {
            self.peer.metrics.verify_failures.inc();
            return Err("bytes that do not match the published hash".into());
        }
        Ok(data)
    }

    /// Writes a chunk into the hidden partial file and marks it held (served from now on).
    async fn land(&self, index: u32, hash: Hash, data: Vec<u8>) -> Result<(), DownloadError> {
        let (part, len) = (self.part.clone(), data.len() as u64);
        tokio::task::spawn_blocking(move || part.write(index, hash, &data))
            .await
            .map_err(|e| DownloadError::Local(e.into()))?
            .map_err(|e| {
                DownloadError::Local(anyhow::anyhow!(
                    "cannot write chunk {index} of {:?}: {e}",
                    self.name
                ))
            })?;
        self.transfer.landed(len);
        Ok(())
    }
}
