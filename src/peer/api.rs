//! The node's local HTTP API (`SHOAL_API_ADDR`): `GET /v1/files` (the swarm's files and this
//! node's state of each), `GET|HEAD /v1/files/{name}` (a file's bytes, streamed as its chunks
//! arrive, with ranges), `GET /v1/status` (this node), and the registry mirror under `/v2/`
//! (see [`mirror`](super::mirror)). Errors are JSON `{"error": "..."}`.
//! docs/API.md is the reference. There is no authentication: it is meant for the node itself.

pub(super) mod stream;

use super::origin::{self, Failure};
use super::store::StoredFile;
use super::tracker_client::TrackerError;
use super::transfers::{Resolved, Transfer, WantError};
use super::Peer;
use crate::protocol::{self, FileInfo, Hash};
use crate::tls::HttpClients;
use hyper::header::{self, HeaderValue};
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioTimer;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use stream::{Body, Wanted};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// A request's headers must arrive within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish when the peer stops.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Serves the API on `listener` until the peer stops.
pub async fn serve(peer: Arc<Peer>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Some((stream, remote)) = crate::connection::accept(&listener, &peer.stop).await else {
            return;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(remote = %remote, limit = MAX_CONNECTIONS, "API connection refused: too many open");
            continue;
        };
        let span = tracing::debug_span!("api", remote = %remote);
        let peer = peer.clone();
        peer.tasks.clone().spawn(
            async move {
                connection(peer, stream).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Serves one connection until the client closes it or the peer stops.
async fn connection(peer: Arc<Peer>, stream: tokio::net::TcpStream) {
    let stop = peer.stop.clone();
    let tls = peer.tls.as_deref().filter(|_| peer.cfg.api_tls);
    let io = tokio::select! {
        io = crate::metrics::http_stream(tls, HttpClients::Certified, stream) => io,
        _ = stop.cancelled() => return,
    };
    let io = match io {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!(error = %e, "API connection refused");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
        }
    };
    match ended {
        Ok(()) => tracing::debug!("API connection closed"),
        Err(e) => tracing::debug!(error = %e, "API connection ended with an error"),
    }
}

/// The fixed routes, as the metrics label them.
#[derive(Clone, Copy)]
enum Route<'a> {
    Files,
    File(&'a str),
    Status,
    Mirror,
    Other,
}

impl Route<'_> {
    fn of(path: &str) -> Route<'_> {
        match path {
            "/v1/files" => Route::Files,
            "/v1/status" => Route::Status,
            "/v2" => Route::Mirror,
            p if p.starts_with("/v2/") => Route::Mirror,
            p => match p.strip_prefix("/v1/files/") {
                Some(name) => Route::File(name),
                None => Route::Other,
            },
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Files => "files",
            Route::File(_) => "file",
            Route::Status => "status",
            Route::Mirror => "mirror",
            Route::Other => "other",
        }
    }
}

async fn handle(peer: &Arc<Peer>, req: Request<Incoming>) -> Response<Body> {
    let route = Route::of(req.uri().path());
    let response = match route {
        Route::Other => error(
            StatusCode::NOT_FOUND,
            "no such endpoint: try /v1/files, /v1/files/{name}, /v1/status or /v2/",
        ),
        Route::Mirror => super::mirror::handle(peer, &req).await,
        _ if req.method() != Method::GET && req.method() != Method::HEAD => {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: this API answers GET and HEAD only",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        Route::Files => files(peer).await,
        Route::Status => status(peer),
        Route::File(name) => file(peer, &req, name).await,
    };
    let code = response.status().as_u16().to_string();
    peer.metrics
        .api_requests
        .with_label_values(&[route.label(), &code])
        .inc();
    response
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut body = serde_json::to_vec(value).expect("serialisable");
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::whole(body))
        .expect("valid response")
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// The status and message for a tracker that could not answer.
fn tracker_error(e: &TrackerError) -> Response<Body> {
    let status = match e {
        TrackerError::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        TrackerError::Refused { .. } => StatusCode::BAD_GATEWAY,
    };
    error(status, e.to_string())
}

fn want_error(e: &WantError) -> Response<Body> {
    match e {
        WantError::NotFound(why) => error(StatusCode::NOT_FOUND, why.as_str()),
        WantError::BadName(why) => error(StatusCode::BAD_REQUEST, why.as_str()),
        WantError::Tracker(e) => tracker_error(e),
        WantError::Other(why) => error(StatusCode::INTERNAL_SERVER_ERROR, why.as_str()),
    }
}

/// This node's state of one file version.
#[derive(Serialize)]
struct Held {
    /// `absent`, `partial` or `complete`.
    state: &'static str,
    /// Share of the file's chunks held here, 0 to 100, one decimal.
    percent: f64,
    chunks_held: u64,
}

fn held(peer: &Peer, info: &FileInfo) -> Held {
    match peer.store.version(&info.name, &info.digest) {
        Some(f) if f.is_final() => share("complete", f.have().count() as u64, info.chunks()),
        Some(f) => share("partial", f.have().count() as u64, info.chunks()),
        None => share("absent", 0, info.chunks()),
    }
}

/// A file in `state` of which `count` of `total` chunks are held here.
fn share(state: &'static str, count: u64, total: u64) -> Held {
    let percent = match (state, total) {
        ("absent", _) => 0.0,
        (_, 0) => 100.0,
        (_, total) => (count as f64 * 1000.0 / total as f64).floor() / 10.0,
    };
    Held {
        state,
        percent,
        chunks_held: count,
    }
}

/// One entry of `GET /v1/files`.
#[derive(Serialize)]
struct FileEntry<'a> {
    #[serde(flatten)]
    info: &'a FileInfo,
    chunks: u64,
    published: u64,
    latest: bool,
    peers: u64,
    seeders: u64,
    #[serde(flatten)]
    here: Held,
}

/// `GET /v1/files`: every version the swarm offers, with this node's state of each.
async fn files(peer: &Peer) -> Response<Body> {
    let list = match peer.trackers.file_list(true).await {
        Ok(list) => list,
        Err(e) => return tracker_error(&e),
    };
    let files: Vec<FileEntry> = list
        .files
        .iter()
        .map(|f| FileEntry {
            info: &f.info,
            chunks: f.chunks,
            published: f.published,
            latest: f.latest,
            peers: f.peers,
            seeders: f.seeders,
            here: held(peer, &f.info),
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "files": files }))
}

/// One file of `GET /v1/status`.
#[derive(Serialize)]
struct FileStatus<'a> {
    name: &'a str,
    /// `null` while the file is pulled from the origin and not every chunk hash is known.
    digest: Option<Hash>,
    size: u64,
    #[serde(flatten)]
    here: Held,
    /// Whether a download of it is running.
    downloading: bool,
    download_bytes_per_second: u64,
    /// Its chunk bytes sent to other peers per second, recently.
    upload_bytes_per_second: u64,
    /// Holders being fetched from now.
    sources: Vec<String>,
    /// API readers of it now.
    readers: usize,
}

/// `GET /v1/status`: this node, its files, transfers and traffic.
fn status(peer: &Peer) -> Response<Body> {
    type Key = (String, Option<Hash>);
    let mut held_here: BTreeMap<Key, Arc<StoredFile>> = BTreeMap::new();
    for f in peer.store.all() {
        held_here.insert((f.info.name.clone(), Some(f.info.digest)), f);
    }
    let mut transfers: BTreeMap<Key, Arc<Transfer>> = BTreeMap::new();
    for t in peer.transfers.all() {
        transfers.insert((t.name.clone(), t.digest()), t);
    }
    let mut keys: Vec<&Key> = held_here.keys().chain(transfers.keys()).collect();
    keys.sort();
    keys.dedup();
    let files: Vec<FileStatus> = keys
        .into_iter()
        .map(|key| {
            let (f, t) = (held_here.get(key), transfers.get(key));
            let (size, here) = match (f, t) {
                (Some(f), _) => (f.info.size, held(peer, &f.info)),
                (None, Some(t)) => {
                    let (size, chunk_size) = t.shape().unwrap_or((0, 1));
                    let chunks = protocol::chunk_count(size, chunk_size);
                    (size, share("partial", t.chunks_held(), chunks))
                }
                (None, None) => unreachable!("listed"),
            };
            FileStatus {
                name: &key.0,
                digest: key.1,
                size,
                here,
                downloading: t.is_some(),
                download_bytes_per_second: t.map_or(0, |t| t.down.rate()),
                upload_bytes_per_second: f.map_or(0, |f| f.sent.rate()),
                sources: t.map(|t| t.sources()).unwrap_or_default(),
                readers: t.map_or(0, |t| t.reader_count()),
            }
        })
        .collect();
    let up = peer.up.rate();
    let limit = peer.cfg.upload_limit;
    let use_percent = (limit > 0).then(|| (up as f64 * 1000.0 / limit as f64).round() / 10.0);
    let body = serde_json::json!({
        "peer_id": peer.peer_id(),
        "name": peer.name,
        "tracker": peer.cfg.tracker,
        "registered": peer.is_registered(),
        "listen": peer.listen_addr.to_string(),
        "download_bytes_per_second": peer.down.rate(),
        "upload_bytes_per_second": up,
        "upload_limit_bytes_per_second": limit,
        "upload_use_percent": use_percent,
        "transfers": transfers.len(),
        "api_streams": peer.metrics.api_streams.get(),
        "files": files,
    });
    json(StatusCode::OK, &body)
}

/// `GET|HEAD /v1/files/{name}[?digest=D]`.
async fn file(peer: &Arc<Peer>, req: &Request<Incoming>, raw: &str) -> Response<Body> {
    let name = match percent_encoding::percent_decode_str(raw).decode_utf8() {
        Ok(name) => name.into_owned(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the name is not UTF-8 once percent-decoded",
            )
        }
    };
    let digest = match query_digest(req.uri().query()) {
        Ok(d) => d,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    // HEAD only looks; GET starts (or joins) the download of a file not held here.
    let (size, digest, transfer) = if req.method() == Method::HEAD {
        match look(peer, &name, digest).await {
            Ok((size, digest)) => (size, digest, None),
            Err(r) => return r,
        }
    } else {
        let t = match peer.want(&name, digest).await {
            Ok(t) => t,
            Err(e) => return want_error(&e),
        };
        match t.ready().await {
            Ok((size, chunk_size)) => (size, t.digest(), Some((t, chunk_size))),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    };
    let mut head = Response::builder().header(header::ACCEPT_RANGES, "bytes");
    // A file being pulled from the origin has no digest until every chunk hash is known.
    if let Some(digest) = digest {
        let etag = format!("\"{}\"", digest.to_hex());
        head = head.header(header::ETAG, &etag);
        if matches_etag(req, &etag) {
            return head
                .status(StatusCode::NOT_MODIFIED)
                .body(Body::empty())
                .expect("valid response");
        }
    }
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok());
    let (first, last) = match stream::wanted(range, size) {
        Wanted::Unsatisfiable => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the range {range:?} lies outside the file's {size} bytes"),
            );
            let all = HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii");
            r.headers_mut().insert(header::CONTENT_RANGE, all);
            return r;
        }
        Wanted::Part(first, last) => {
            let span = format!("bytes {first}-{last}/{size}");
            head = head
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, span);
            (first, last)
        }
        Wanted::Whole => (0, size.saturating_sub(1)),
    };
    let len = if size == 0 { 0 } else { last - first + 1 };
    let head = head
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len);
    let body = match transfer {
        Some((t, chunk_size)) if len > 0 => stream::file_bytes(peer, t, chunk_size, (first, last)),
        _ => Body::empty(),
    };
    head.body(body).expect("valid response")
}

/// The size and digest of `name` (version `digest`, or the newest) for `HEAD`, without starting
/// a download: held here, known to the swarm, or (without a digest) at the origin, whose `HEAD`
/// gives the size; a file that is only at the origin has no digest yet.
async fn look(
    peer: &Peer,
    name: &str,
    digest: Option<Hash>,
) -> Result<(u64, Option<Hash>), Response<Body>> {
    match peer.resolve(name, digest).await {
        Ok(Resolved::Held(f)) => Ok((f.info.size, Some(f.info.digest))),
        Ok(Resolved::Swarm(loc)) => Ok((loc.file.size, Some(loc.file.digest))),
        Err(WantError::NotFound(why)) => {
            let Some(source) = peer.origin.source(name).filter(|_| digest.is_none()) else {
                return Err(error(StatusCode::NOT_FOUND, why));
            };
            match origin::head(peer, &source).await {
                Ok(remote) => Ok((remote.size, None)),
                Err(e) if e.failure == Failure::NotFound => Err(error(
                    StatusCode::NOT_FOUND,
                    format!("{why}, nor does the origin: {e}"),
                )),
                Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            }
        }
        Err(e) => Err(want_error(&e)),
    }
}

/// The version pinned by `?digest=D`, if any.
fn query_digest(query: Option<&str>) -> Result<Option<Hash>, String> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("digest=") {
            return Hash::from_hex(value).map(Some).ok_or_else(|| {
                format!("digest {value:?} is not 64 hex digits, as /v1/files lists them")
            });
        }
    }
    Ok(None)
}

/// Whether `If-None-Match` names this version (or `*`).
fn matches_etag(req: &Request<Incoming>, etag: &str) -> bool {
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}
