//! The peer's chunk server: answers message 5 with a header line and the raw chunk bytes, for
//! chunks it holds verified, of files it registered, under the shared upload rate limit.
//! Requests on one connection are answered in order, one at a time; a client may pipeline
//! further requests, which wait in the socket buffer (the in-flight bound is that buffer).
//! A chunk is sent only in one of the upload slots; a request that cannot get one within a
//! third of the chunk timeout is refused with `busy`, and a whole send is bounded by the chunk
//! timeout, so a requester that vanished (a network partition) holds a slot for that long at
//! most instead of queueing everyone behind it.

use super::origin::PullPart;
use super::store::{ReadError, StoredFile};
use super::Peer;
use crate::connection::{Connection, FrameError, Limits};
use crate::metrics::Active;
use crate::protocol::{
    decode_body, decode_envelope, encode_refusal, encode_reply, secret_matches, validate_name,
    ChunkHeader, ChunkRequest, ErrorCode, Msg, Refusal,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, SemaphorePermit};
use tracing::Instrument;

/// Longest request line a peer accepts: a chunk request is small (names are <= 1024 bytes).
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Bytes sent per rate-limiter grant, so concurrent uploads interleave fairly.
const SLICE: usize = 64 * 1024;

/// A token bucket shared by every upload of this peer. `0` means unlimited.
pub struct RateLimiter {
    bytes_per_sec: u64,
    /// (available tokens, last refill); may go negative: the debt is waited out.
    bucket: std::sync::Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec,
            bucket: std::sync::Mutex::new((0.0, Instant::now())),
        }
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn acquire(&self, n: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let rate = self.bytes_per_sec as f64;
        let wait = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // At most a tenth of a second of burst, so the cap holds over short windows too.
            let burst = (rate / 10.0).max(SLICE as f64);
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(burst);
            b.1 = now;
            b.0 -= n as f64;
            if b.0 < 0.0 {
                Duration::from_secs_f64(-b.0 / rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Accepts chunk requests until the peer stops.
pub async fn run(peer: Arc<Peer>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(peer.cfg.max_connections));
    let limits = Limits {
        max_frame: MAX_REQUEST_BYTES,
        idle_timeout: peer.cfg.idle_timeout,
        frame_timeout: peer.cfg.chunk_timeout,
    };
    loop {
        let Some((stream, remote)) = crate::connection::accept(&listener, &peer.stop).await else {
            return;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let why = format!(
                "peer is at its limit of {} connections; retry later",
                peer.cfg.max_connections
            );
            let tls = peer.tls.clone();
            peer.tasks.spawn(async move {
                let Some(mut conn) =
                    crate::tls::accept_to_refuse(tls.as_deref(), stream, limits).await
                else {
                    return;
                };
                let _ = conn
                    .write_line(&encode_refusal(0, &Refusal::new(ErrorCode::Busy, why)))
                    .await;
                let _ = conn.flush().await;
            });
            continue;
        };
        let peer2 = peer.clone();
        let span = tracing::debug_span!("upload", remote = %remote);
        peer.tasks.spawn(
            async move {
                let accepted = tokio::select! {
                    _ = peer2.stop.cancelled() => Err("shutdown".to_string()),
                    a = crate::tls::accept(peer2.tls.as_deref(), stream, limits) => a,
                };
                let reason = match accepted {
                    Ok(mut conn) => serve(&peer2, &mut conn).await.to_string(),
                    Err(why) => why,
                };
                tracing::debug!(reason, "upload connection closed");
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn serve(peer: &Peer, conn: &mut Connection) -> &'static str {
    let mut buf = Vec::new();
    loop {
        let line = tokio::select! {
            _ = peer.stop.cancelled() => return "shutdown",
            line = conn.read_line() => line,
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => return "closed by peer",
            Err(FrameError::TooLong(max)) => {
                let r = Refusal::new(
                    ErrorCode::FrameTooLong,
                    format!("request line exceeds {max} bytes"),
                );
                let _ = conn.write_line(&encode_refusal(0, &r)).await;
                let _ = conn.flush().await;
                return "frame too long";
            }
            Err(_) => return "read failed or timed out",
        };
        let answer = match check(peer, &line) {
            Ok((req, source)) => match upload_slot(peer, conn).await {
                Ok(slot) => load(peer, &req, &source, &mut buf)
                    .await
                    .map(|header| (header, source, req.peer_id, slot)),
                Err(Queued::Refused(refused)) => Err(refused),
                Err(Queued::Ended(reason)) => return reason,
            },
            Err(refused) => Err(refused),
        };
        match answer {
            Ok((header, source, requester, _slot)) => {
                let active = Active::new(&peer.metrics.active_transfers);
                // The requester reads a whole chunk within the chunk timeout; a send that takes
                // longer is wasted, and its slot is better given to someone who is listening.
                let sent = tokio::time::timeout(
                    peer.cfg.chunk_timeout,
                    send_chunk(peer, conn, &header, &buf),
                )
                .await;
                drop(active);
                if !matches!(sent, Ok(Ok(()))) {
                    return "write failed or stalled";
                }
                let seeding = match &source {
                    Source::Stored(file) => {
                        file.sent.add(header.length.into());
                        file.seeding.as_ref()
                    }
                    Source::Pulled(_) => None,
                };
                if seeding.is_some_and(|s| s.sent(header.index, requester, Instant::now())) {
                    tracing::info!(file = %header.file, "every chunk has gone out once; serving freely");
                }
                tracing::trace!(file = %header.file, chunk = header.index, "chunk sent");
            }
            Err((n, refusal)) => {
                peer.metrics
                    .requests_refused
                    .with_label_values(&[refusal.code.as_str()])
                    .inc();
                tracing::debug!(
                    code = refusal.code.as_str(),
                    reason = %refusal.message,
                    "refused chunk request"
                );
                if conn.write_line(&encode_refusal(n, &refusal)).await.is_err() {
                    return "write failed";
                }
            }
        }
        if !conn.has_buffered_line() && conn.flush().await.is_err() {
            return "write failed";
        }
    }
}

/// Parses and checks a request line up to what needs the store: the message number, the
/// fields, the secret and the name. The refusal carries the message number to echo.
pub fn parse_request(line: &[u8], secret: Option<&str>) -> Result<ChunkRequest, (u64, Refusal)> {
    let (msg, _) = decode_envelope(line)?;
    let n = msg as u64;
    if msg != Msg::ChunkRequest {
        let why = format!("a peer answers only message 5, not {n}");
        return Err((n, Refusal::new(ErrorCode::UnknownMsg, why)));
    }
    let req: ChunkRequest = decode_body(line).map_err(|r| (n, r))?;
    if !secret_matches(secret, req.secret.as_deref()) {
        let why = "missing or wrong cluster secret";
        return Err((n, Refusal::new(ErrorCode::Unauthorized, why)));
    }
    validate_name(&req.file).map_err(|r| (n, r))?;
    Ok(req)
}

/// Why a request got no upload slot.
enum Queued {
    /// Refused with this (to send).
    Refused((u64, Refusal)),
    /// The connection is done: the requester closed it, or the peer is stopping.
    Ended(&'static str),
}

/// Waits for an upload slot, but not for ever: a requester waits at most the chunk timeout for
/// its reply, so after a third of it `busy` sends it elsewhere. A requester that closes its side
/// meanwhile has given up, so its request is dropped.
async fn upload_slot<'a>(
    peer: &'a Peer,
    conn: &mut Connection,
) -> Result<SemaphorePermit<'a>, Queued> {
    let wait = peer.cfg.chunk_timeout / 3;
    let slot = tokio::select! {
        slot = tokio::time::timeout(wait, peer.upload_slots.acquire()) => slot,
        () = conn.closed() => return Err(Queued::Ended("closed by peer while queued")),
    };
    match slot {
        Ok(Ok(slot)) => Ok(slot),
        Ok(Err(_)) => Err(Queued::Ended("shutdown")),
        Err(_) => {
            let why = format!(
                "all {} upload slots stayed busy for {wait:?}; ask another holder",
                peer.cfg.upload_slots
            );
            let busy = Refusal::new(ErrorCode::Busy, why);
            Err(Queued::Refused((Msg::ChunkRequest as u64, busy)))
        }
    }
}

/// What a chunk is read from: a file this peer holds (shared or downloading), or the hidden
/// data of a pull from the origin whose digest is not known yet.
enum Source {
    Stored(Arc<StoredFile>),
    Pulled(Arc<PullPart>),
}

/// Checks a request line against the store: the request, and the file it names, whose chunk
/// this peer holds verified. A request without a digest for a name this peer is pulling from
/// the origin is served from that pull.
fn check(peer: &Peer, line: &[u8]) -> Result<(ChunkRequest, Source), (u64, Refusal)> {
    let req = parse_request(line, peer.cfg.secret.as_deref())?;
    let n = Msg::ChunkRequest as u64;
    let origin = &peer.origin;
    if let Some(part) = origin.part(&req.file) {
        if req.digest.is_none() && peer.store.get(&req.file).is_none() {
            if !part.holds(req.index) {
                let why = format!("chunk {} is not here yet", req.index);
                return Err((n, Refusal::new(ErrorCode::NotFound, why)));
            }
            return Ok((req, Source::Pulled(part)));
        }
    }
    let pulling = origin.is_pulling(&req.file);
    let file = peer
        .store
        .find(&req.file, req.digest.as_ref())
        .ok_or_else(|| {
            if pulling {
                // The tracker may list this peer a moment before its pull from the origin
                // turns into a download that serves: not here yet, rather than unknown.
                let why = format!("{:?} is still arriving from the origin", req.file);
                return (n, Refusal::new(ErrorCode::NotFound, why));
            }
            let version = req
                .digest
                .map(|d| format!("version {} of ", d.to_hex()))
                .unwrap_or_default();
            (
                n,
                Refusal::new(
                    ErrorCode::UnknownFile,
                    format!("this peer does not share {version}{:?}", req.file),
                ),
            )
        })?;
    if u64::from(req.index) >= file.info.chunks() {
        let why = format!(
            "chunk {} is out of range: {:?} has {} chunks",
            req.index,
            req.file,
            file.info.chunks()
        );
        return Err((n, Refusal::new(ErrorCode::OutOfRange, why)));
    }
    if !file.has_chunk(req.index) {
        return Err((
            n,
            Refusal::new(
                ErrorCode::NotFound,
                format!("chunk {} is not here yet", req.index),
            ),
        ));
    }
    Ok((req, Source::Stored(file)))
}

/// With an upload slot held: the chunk's header, with its bytes read into `buf` and checked
/// against the chunk's hash, unless an origin in initial seeding sent that chunk to someone
/// else moments ago. A file changed on disk is refused with `not_found` (the requester looks
/// elsewhere without blaming this peer) and the catalogue is woken to withdraw and re-hash it.
async fn load(
    peer: &Peer,
    req: &ChunkRequest,
    source: &Source,
    buf: &mut Vec<u8>,
) -> Result<ChunkHeader, (u64, Refusal)> {
    let file = match source {
        Source::Stored(file) => file,
        Source::Pulled(part) => return load_pulled(req, part, buf).await,
    };
    let n = Msg::ChunkRequest as u64;
    if file
        .seeding
        .as_ref()
        .is_some_and(|s| s.refer_elsewhere(req.index, req.peer_id, Instant::now()))
    {
        let why = format!(
            "chunk {} went to another peer moments ago: fetch it there",
            req.index
        );
        return Err((n, Refusal::new(ErrorCode::Elsewhere, why)));
    }
    let mut owned = std::mem::take(buf);
    let index = req.index;
    let (result, back) = tokio::task::spawn_blocking({
        let file = file.clone();
        move || {
            let r = file.read_verified(index, &mut owned);
            (r, owned)
        }
    })
    .await
    .map_err(|e| {
        (
            n,
            Refusal::new(ErrorCode::Internal, format!("read task failed: {e}")),
        )
    })?;
    *buf = back;
    result.map_err(|e| {
        let code = match e {
            ReadError::Changed => {
                peer.rescan.notify_one();
                ErrorCode::NotFound
            }
            ReadError::Io(_) => ErrorCode::Internal,
        };
        (n, Refusal::new(code, format!("chunk {index}: {e}")))
    })?;
    let header = ChunkHeader {
        file: req.file.clone(),
        index,
        length: buf.len() as u32,
        hash: file.hashes.0[index as usize],
    };
    Ok(header)
}

/// With an upload slot held: a chunk of a pull from the origin, read and checked against the
/// hash this peer published for it.
async fn load_pulled(
    req: &ChunkRequest,
    part: &Arc<PullPart>,
    buf: &mut Vec<u8>,
) -> Result<ChunkHeader, (u64, Refusal)> {
    let n = Msg::ChunkRequest as u64;
    let mut owned = std::mem::take(buf);
    let (index, part) = (req.index, part.clone());
    let (hash, back) = tokio::task::spawn_blocking(move || {
        let hash = part.read_verified(index, &mut owned);
        (hash, owned)
    })
    .await
    .map_err(|e| {
        let why = format!("read task failed: {e}");
        (n, Refusal::new(ErrorCode::Internal, why))
    })?;
    *buf = back;
    let hash = hash.ok_or_else(|| {
        let why = format!("chunk {index} cannot be read back as it was published");
        (n, Refusal::new(ErrorCode::NotFound, why))
    })?;
    Ok(ChunkHeader {
        file: req.file.clone(),
        index,
        length: buf.len() as u32,
        hash,
    })
}

async fn send_chunk(
    peer: &Peer,
    conn: &mut Connection,
    header: &ChunkHeader,
    data: &[u8],
) -> std::io::Result<()> {
    conn.write_line(&encode_reply(Msg::ChunkRequest, header))
        .await?;
    for slice in data.chunks(SLICE) {
        peer.upload.acquire(slice.len()).await;
        conn.write_raw(slice).await?;
    }
    peer.metrics.chunks_uploaded.inc();
    peer.metrics.bytes_uploaded.inc_by(data.len() as u64);
    peer.up.add(data.len() as u64);
    Ok(())
}
