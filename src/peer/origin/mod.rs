//! Pull-through from an HTTP origin. A wanted name that no peer shares is fetched from its
//! [`Source`] (`{SHOAL_ORIGIN}/{name}`, or the upstream registry a mirror request routed the
//! name to) in chunks, with range requests, coordinated through the
//! tracker (message 9) so that peers asking at once split the file between them: each peer
//! fetches only the chunks it was granted, hashes each as it lands and publishes the hash, and
//! meanwhile fetches chunks others published from them (checked against those hashes). Once
//! every hash is known the tracker indexes the file as an ordinary version; [`pull`] returns
//! its digest and the download engine fetches whatever is still missing.
//!
//! Until then the data sits in the download's hidden `.shoal-part` file, never under the
//! file's name; a failure leaves only that, and the next attempt starts it afresh.

mod http;
mod part;
mod pull;

pub use http::{exchange, Failure, OriginUrl, Remote, Source};
pub use part::PullPart;

use super::download::DownloadError;
use super::transfers::Transfer;
use super::Peer;
use crate::bitfield::Bitfield;
use crate::chunking::auto_chunk_size;
use crate::protocol::{FileInfo, Hash};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Tries of one origin request before a transient failure (5xx, timeout, connection) ends
/// the pull.
pub const ATTEMPTS: u32 = 4;
/// Wait before the second try; it doubles before each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// A failed origin transfer: which URL, what went wrong, after how many tries.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{url}: {failure}{}", tries(*attempts))]
pub struct OriginError {
    pub url: String,
    pub failure: Failure,
    pub attempts: u32,
}

fn tries(attempts: u32) -> String {
    if attempts > 1 {
        format!(" (gave up after {attempts} tries)")
    } else {
        String::new()
    }
}

/// Names routed to a source of their own ([`Origin::route`]) that are remembered; the oldest
/// is forgotten first.
const MAX_ROUTES: usize = 10_000;

/// This peer's way to origins: where each name comes from, the cap on requests in flight, and
/// the names being pulled now (one pull of a name at a time; a request for a chunk of one is
/// answered from the pull, or "not here yet" rather than "unknown").
pub struct Origin {
    /// `SHOAL_ORIGIN`: where names without a route of their own come from, if anywhere.
    pub base: Option<OriginUrl>,
    /// Name -> its own source, with the order names were routed in (oldest first). Held for a
    /// map operation only.
    routes: Mutex<(HashMap<String, Source>, VecDeque<String>)>,
    slots: Semaphore,
    /// Name -> its turn: one pull of a name runs here at a time (the daemon's, the API's and
    /// others wait for it). Held for a map operation only, never across an await.
    pulling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Name -> the data of its pull while the digest is not known, served to other pullers.
    /// Held for a map operation only.
    parts: Mutex<HashMap<String, Arc<PullPart>>>,
}

impl Origin {
    pub fn new(base: Option<OriginUrl>, concurrency: usize) -> Origin {
        Origin {
            base,
            routes: Mutex::default(),
            slots: Semaphore::new(concurrency),
            pulling: Mutex::new(HashMap::new()),
            parts: Mutex::new(HashMap::new()),
        }
    }

    /// Where `name` is pulled from: its own route, else under `SHOAL_ORIGIN`, else nowhere.
    pub fn source(&self, name: &str) -> Option<Source> {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        match routes.0.get(name) {
            Some(source) => Some(source.clone()),
            None => self.base.as_ref().map(|b| b.source(name)),
        }
    }

    /// Whether `name` has a source to be pulled from.
    pub fn has(&self, name: &str) -> bool {
        self.source(name).is_some()
    }

    /// Pulls of `name` come from `source` from now on (the newest route wins: a registry
    /// client's credentials may expire, so the latest client's are used).
    pub fn route(&self, name: &str, source: Source) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *routes;
        if map.insert(name.to_string(), source).is_none() {
            order.push_back(name.to_string());
            if order.len() > MAX_ROUTES {
                if let Some(oldest) = order.pop_front() {
                    map.remove(&oldest);
                }
            }
        }
    }

    /// Whether `name` is being pulled from the origin here (or waits for its turn).
    pub fn is_pulling(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.pulling.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The data of the pull of `name` running here, if one is.
    pub fn part(&self, name: &str) -> Option<Arc<PullPart>> {
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        parts.get(name).cloned()
    }

    fn set_part(&self, name: &str, part: Option<Arc<PullPart>>) {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        match part {
            Some(part) => parts.insert(name.to_string(), part),
            None => parts.remove(name),
        };
    }

    /// Waits until no other pull of `name` runs here; `name` counts as pulled until the guard
    /// drops.
    pub async fn turn<'a>(&'a self, name: &str) -> Turn<'a> {
        let lock = self.lock().entry(name.to_string()).or_default().clone();
        Turn {
            origin: self,
            name: name.to_string(),
            held: Some(lock.lock_owned().await),
        }
    }
}

pub struct Turn<'a> {
    origin: &'a Origin,
    name: String,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut pulling = self.origin.lock();
        // Only the map still holds the lock: nobody pulls this name or waits to.
        if pulling
            .get(&self.name)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            pulling.remove(&self.name);
        }
    }
}

/// What a pull leaves for the download engine: the version's digest, and which chunks of the
/// hidden partial file this peer fetched (the engine checks them again before trusting them).
pub struct Pulled {
    pub digest: Hash,
    pub size: u64,
    pub held: Vec<u32>,
}

/// Fetches this peer's share of `name` from the origin until the tracker knows every chunk
/// hash (see the module comment), telling `transfer` (and so its readers) of each chunk.
pub async fn pull(
    peer: &Arc<Peer>,
    origin: &Arc<Origin>,
    name: &str,
    transfer: &Arc<Transfer>,
) -> Result<Pulled, DownloadError> {
    let source = source_of(origin, name)?;
    let url = source.url();
    let remote = head(peer, &source).await?;
    tracing::info!(url = %url, size = remote.size, validator = %remote.validator(), "pulling from the origin");
    let file = {
        let (peer, name, size) = (peer.clone(), name.to_string(), remote.size);
        tokio::task::spawn_blocking(move || peer.store.origin_part(&name, size))
            .await
            .map_err(|e| DownloadError::Local(e.into()))?
            .map_err(DownloadError::Local)?
    };
    let chunk_size = peer
        .cfg
        .chunk_size
        .unwrap_or_else(|| auto_chunk_size(remote.size));
    let part = Arc::new(PullPart::new(file, remote.size, chunk_size));
    let job = Arc::new(pull::Job {
        peer: peer.clone(),
        origin: origin.clone(),
        source,
        name: name.to_string(),
        published: remote.modified_ms().unwrap_or_else(now_ms),
        remote,
        part: part.clone(),
        transfer: transfer.clone(),
        tracker: Mutex::new(None),
    });
    origin.set_part(name, Some(part));
    let pulled = job.run().await;
    origin.set_part(name, None);
    if let Err(e) = &pulled {
        if !matches!(e, DownloadError::Stopped(_)) {
            job.abandon().await;
        }
    }
    pulled
}

/// The source of `name`; a name without one is not at any origin.
pub fn source_of(origin: &Origin, name: &str) -> Result<Source, OriginError> {
    origin.source(name).ok_or_else(|| OriginError {
        url: name.to_string(),
        failure: Failure::NotFound,
        attempts: 0,
    })
}

/// What `source` says of its file now (size and validators), retried like every request.
pub async fn head(peer: &Peer, source: &Source) -> Result<Remote, OriginError> {
    let timeout = peer.cfg.origin_timeout;
    retried(peer, &source.url(), || http::head(source, timeout)).await
}

/// Fetches chunk `index` of the known version `info` from `source` (described by `remote`)
/// and checks it against its published `hash`.
pub async fn fetch_known(
    peer: &Peer,
    origin: &Origin,
    source: &Source,
    (info, remote): (&FileInfo, &Remote),
    index: u32,
    hash: Hash,
) -> Result<Vec<u8>, OriginError> {
    let url = source.url();
    let changed = |why: String| OriginError {
        url: url.clone(),
        failure: Failure::Changed(why),
        attempts: 1,
    };
    if remote.size != info.size {
        let why = format!(
            "it has {} bytes, version {} has {}",
            remote.size,
            info.digest.to_hex(),
            info.size
        );
        return Err(changed(why));
    }
    let _slot = origin.slots.acquire().await.expect("never closed");
    let timeout = peer.cfg.origin_timeout;
    let span = info.chunk_span(index);
    let data = retried(peer, &url, || http::range(source, remote, span, timeout)).await?;
    peer.metrics.origin_bytes.inc_by(data.len() as u64);
    if Hash::of(&data) != hash {
        let why = format!(
            "its chunk {index} is not that of version {}",
            info.digest.to_hex()
        );
        return Err(changed(why));
    }
    Ok(data)
}

/// Runs one origin request until it succeeds, fails for good (404, a changed file, an unusable
/// answer) or fails [`ATTEMPTS`] times, waiting longer after each failure. Counts requests and
/// errors by kind.
async fn retried<T, F, Fut>(peer: &Peer, url: &str, mut request: F) -> Result<T, OriginError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0;
    loop {
        attempt += 1;
        peer.metrics.origin_requests.inc();
        let failure = match request().await {
            Ok(answer) => return Ok(answer),
            Err(failure) => failure,
        };
        peer.metrics
            .origin_errors
            .with_label_values(&[failure.kind()])
            .inc();
        if !failure.transient() || attempt >= ATTEMPTS {
            return Err(OriginError {
                url: url.to_string(),
                failure,
                attempts: attempt,
            });
        }
        tracing::info!(url, attempt, error = %failure, retry_in = ?backoff, "origin request failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The chunks of a pull as a bitfield of `chunks`.
pub fn held_bits(held: &[u32], chunks: usize) -> Bitfield {
    let mut bits = Bitfield::new(chunks);
    for &i in held {
        bits.set(i as usize);
    }
    bits
}
