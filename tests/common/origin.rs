//! A test HTTP origin: serves the files of a directory (names with `/` included) over HTTP/1.1
//! with a single `Range` (206, or 416 past the end), `ETag`, `Last-Modified` and
//! `Content-Length`, answers `HEAD`, and reports what it sent at `GET /-/stats` as
//! `{"bytes_sent": N, "requests": N}`. [`Faults`] make it misbehave for tests: answer 500, stall,
//! or change a file after some ranges. Self-contained: `examples/origin.rs` builds it as a
//! binary (`origin <dir> <listen-addr>`), the integration tests run it in-process.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LAST_MODIFIED, RANGE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tokio::net::TcpListener;

/// Misbehaviour on demand; all off by default.
#[derive(Default)]
pub struct Faults {
    /// The next this many requests (file requests, not stats) get 500.
    pub fail_next: AtomicU32,
    /// Every file request is held without an answer.
    pub stall: AtomicBool,
    /// Every range answer waits this many milliseconds first (a slow origin).
    pub delay_ms: AtomicU64,
    /// Range requests starting at or past this offset are held without an answer (0 = none).
    pub stall_from: AtomicU64,
    /// After this many range answers every file has other bytes and another ETag and
    /// Last-Modified (0 = never).
    pub change_after: AtomicU64,
    /// While true, range answers wait (none is lost); `send_replace(false)` lets them all go.
    pub hold: tokio::sync::watch::Sender<bool>,
}

/// What the origin sent.
#[derive(Default)]
pub struct Stats {
    pub bytes_sent: AtomicU64,
    pub requests: AtomicU64,
    ranges: AtomicU64,
}

pub struct Origin {
    dir: PathBuf,
    pub stats: Stats,
    pub faults: Faults,
}

impl Origin {
    pub fn new(dir: &Path) -> Origin {
        Origin {
            dir: dir.to_path_buf(),
            stats: Stats::default(),
            faults: Faults::default(),
        }
    }

    /// Whether files are served changed now (see [`Faults::change_after`]).
    fn changed(&self) -> bool {
        let after = self.faults.change_after.load(Ordering::SeqCst);
        after > 0 && self.stats.ranges.load(Ordering::SeqCst) >= after
    }
}

/// Serves `listener` for ever (until the task is dropped).
pub async fn serve(listener: TcpListener, origin: Arc<Origin>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let origin = origin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let origin = origin.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&origin, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(code.to_string())));
    *r.status_mut() = code;
    r
}

async fn respond(origin: &Origin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/-/stats" {
        let stats = format!(
            r#"{{"bytes_sent": {}, "requests": {}}}"#,
            origin.stats.bytes_sent.load(Ordering::SeqCst),
            origin.stats.requests.load(Ordering::SeqCst)
        );
        return Response::new(Full::new(Bytes::from(stats)));
    }
    origin.stats.requests.fetch_add(1, Ordering::SeqCst);
    if origin.faults.stall.load(Ordering::SeqCst) {
        // Held until the client gives up (or the origin stops).
        std::future::pending::<()>().await;
    }
    let failing = origin
        .faults
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    if failing.is_ok() {
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(file) = local_path(&origin.dir, &path) else {
        return status(StatusCode::NOT_FOUND);
    };
    let Some(meta) = std::fs::metadata(&file).ok().filter(|m| m.is_file()) else {
        return status(StatusCode::NOT_FOUND);
    };
    let size = meta.len();
    let changed = origin.changed();
    let (etag, modified) = validators(&meta, changed);
    let range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, size));
    let (code, first, len) = match range {
        None => (StatusCode::OK, 0, size),
        Some(Some((first, last))) => (StatusCode::PARTIAL_CONTENT, first, last + 1 - first),
        Some(None) => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE);
            let all = HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii");
            r.headers_mut().insert(CONTENT_RANGE, all);
            return r;
        }
    };
    let stall_from = origin.faults.stall_from.load(Ordering::SeqCst);
    if code == StatusCode::PARTIAL_CONTENT && stall_from > 0 && first >= stall_from {
        std::future::pending::<()>().await;
    }
    if code == StatusCode::PARTIAL_CONTENT {
        let _ = origin.faults.hold.subscribe().wait_for(|held| !*held).await;
    }
    let delay = origin.faults.delay_ms.load(Ordering::SeqCst);
    if code == StatusCode::PARTIAL_CONTENT && delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let body = if req.method() == Method::GET {
        match read_at(&file, first, len, changed).await {
            Some(b) => b,
            None => return status(StatusCode::INTERNAL_SERVER_ERROR),
        }
    } else {
        Bytes::new()
    };
    if code == StatusCode::PARTIAL_CONTENT && req.method() == Method::GET {
        origin.stats.ranges.fetch_add(1, Ordering::SeqCst);
    }
    origin
        .stats
        .bytes_sent
        .fetch_add(body.len() as u64, Ordering::SeqCst);
    let mut r = Response::builder()
        .status(code)
        .header(CONTENT_LENGTH, len)
        .header(ETAG, etag)
        .header(LAST_MODIFIED, modified)
        .header("accept-ranges", "bytes");
    if code == StatusCode::PARTIAL_CONTENT {
        let last = first + len - 1;
        r = r.header(CONTENT_RANGE, format!("bytes {first}-{last}/{size}"));
    }
    r.body(Full::new(body)).expect("valid response")
}

/// The file under `dir` a request path names, if it is a plain relative path.
fn local_path(dir: &Path, path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(path.strip_prefix('/')?)
        .decode_utf8()
        .ok()?;
    let relative = Path::new(decoded.as_ref());
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    (plain && !decoded.is_empty()).then(|| dir.join(relative))
}

/// ETag and Last-Modified from the file's size and mtime; a changed file gets others.
fn validators(meta: &std::fs::Metadata, changed: bool) -> (String, String) {
    let generation = u64::from(changed);
    let etag = format!("\"{:x}-{:x}-{generation}\"", meta.size(), meta.mtime_nsec());
    let mtime = meta.modified().unwrap_or(UNIX_EPOCH) + Duration::from_secs(3600 * generation);
    (etag, httpdate::fmt_http_date(mtime))
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` within `size` as (first, last); `None` if it is not
/// satisfiable or not one range.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let (first, last) = value.strip_prefix("bytes=")?.split_once('-')?;
    let (first, last) = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(f), Ok(l)) => (f, l.min(size.checked_sub(1)?)),
        (Ok(f), Err(_)) if last.is_empty() => (f, size.checked_sub(1)?),
        (Err(_), Ok(n)) if first.is_empty() && n > 0 => {
            (size.saturating_sub(n), size.checked_sub(1)?)
        }
        _ => return None,
    };
    (first <= last).then_some((first, last))
}

/// `len` bytes of `path` at `first`; every byte flipped when the file is served changed.
async fn read_at(path: &Path, first: u64, len: u64, changed: bool) -> Option<Bytes> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(path).ok()?;
        let mut buf = vec![0; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, first).ok()?;
        if changed {
            buf.iter_mut().for_each(|b| *b = !*b);
        }
        Some(Bytes::from(buf))
    })
    .await
    .ok()?
}

/// An origin running on its own thread for a test, on 127.0.0.1 port 0; stopped (its port
/// closed, its connections cut) by [`TestOrigin::stop`] or when dropped.
pub struct TestOrigin {
    pub addr: std::net::SocketAddr,
    pub origin: Arc<Origin>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestOrigin {
    pub fn start(dir: &Path) -> TestOrigin {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("bound");
        let origin = Arc::new(Origin::new(dir));
        runtime.spawn(serve(listener, origin.clone()));
        TestOrigin {
            addr,
            origin,
            runtime: Some(runtime),
        }
    }

    /// `SHOAL_ORIGIN` for peers.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn bytes_sent(&self) -> u64 {
        self.origin.stats.bytes_sent.load(Ordering::SeqCst)
    }

    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.stop();
    }
}
