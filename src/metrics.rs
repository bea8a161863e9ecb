//! Prometheus metric handles for both binaries, and the small HTTP server that exposes
//! `/metrics`, `/healthz` (the process is alive) and `/readyz` (it is doing its job).
//! Labels only ever take small fixed value sets: never file names or peer ids, and every value
//! an alert may look for is exported at zero from the start (a rule cannot see a missing series
//! rise). Both registries also carry `process_*` and `shoal_build_info`.

use crate::protocol::{ErrorCode, Msg};
use crate::tls::{HttpClients, Tls};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn counter(reg: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    reg.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(reg: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    reg.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(c.clone())).expect("unique metric");
    c
}

/// A registry holding what every Shoal process exports: the process collector (CPU, memory,
/// open file descriptors, start time) and `shoal_build_info`.
fn process_registry() -> Registry {
    let reg = Registry::new();
    let process = prometheus::process_collector::ProcessCollector::for_self();
    reg.register(Box::new(process)).expect("unique metric");
    let info = IntGaugeVec::new(
        Opts::new(
            "shoal_build_info",
            "Always 1; the labels say which version and source revision this binary was built from.",
        ),
        &["version", "revision"],
    )
    .expect("valid metric");
    info.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("BUILD_INFO_REVISION")])
        .set(1);
    reg.register(Box::new(info)).expect("unique metric");
    reg
}

fn histogram(reg: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    reg.register(Box::new(h.clone())).expect("unique metric");
    h
}

/// Tracker metrics.
#[derive(Clone)]
pub struct TrackerMetrics {
    pub registry: Registry,
    pub registrations: IntCounter,
    pub chunk_registrations: IntCounter,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub peers: IntGauge,
    pub files: IntGauge,
    pub files_owned: IntGauge,
    pub leases_expired: IntCounter,
    pub origin_files: IntGauge,
    pub origin_claims: IntGauge,
}

impl Default for TrackerMetrics {
    fn default() -> Self {
        let registry = process_registry();
        let requests = tracker_requests(&registry);
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "shoal_tracker_request_duration_seconds",
                "Time to handle one request, by message.",
            )
            .buckets(vec![
                0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
            &["msg"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_duration.clone()))
            .expect("unique metric");
        TrackerMetrics {
            registrations: counter(
                &registry,
                "shoal_tracker_registrations_total",
                "Successful peer registrations (message 1).",
            ),
            chunk_registrations: counter(
                &registry,
                "shoal_tracker_chunk_registrations_total",
                "Chunks newly recorded as held through message 4.",
            ),
            peers: gauge(
                &registry,
                "shoal_tracker_peers",
                "Peers currently registered.",
            ),
            files: gauge(
                &registry,
                "shoal_tracker_files",
                "Files currently indexed (held by at least one peer).",
            ),
            files_owned: gauge(
                &registry,
                "shoal_tracker_files_owned",
                "File names currently indexed: the names peers placed here (ownership is by name).",
            ),
            leases_expired: counter(
                &registry,
                "shoal_tracker_leases_expired_total",
                "Peers forgotten because they stopped announcing.",
            ),
            origin_files: gauge(
                &registry,
                "shoal_tracker_origin_files",
                "Files being pulled from an HTTP origin whose digest is not known yet (message 9).",
            ),
            origin_claims: gauge(
                &registry,
                "shoal_tracker_origin_claims",
                "Chunks of origin files claimed by a peer fetching them from the origin now.",
            ),
            requests,
            request_duration,
            registry,
        }
    }
}

/// Tracker requests by message and outcome, every pair present from the start ("invalid" is
/// a frame that names no message).
fn tracker_requests(reg: &Registry) -> IntCounterVec {
    let requests = counter_vec(
        reg,
        "shoal_tracker_requests_total",
        "Requests handled, by message and outcome (ok, error).",
        &["msg", "outcome"],
    );
    let msgs = (1..).map_while(Msg::from_number).map(Msg::label);
    for msg in msgs.chain(["invalid"]) {
        for outcome in ["ok", "error"] {
            requests.with_label_values(&[msg, outcome]);
        }
    }
    requests
}

/// Peer metrics.
#[derive(Clone)]
pub struct PeerMetrics {
    pub registry: Registry,
    pub chunks_downloaded: IntCounter,
    pub chunks_uploaded: IntCounter,
    pub chunks_duplicate: IntCounter,
    pub bytes_downloaded: IntCounter,
    pub bytes_uploaded: IntCounter,
    pub chunk_transfer_duration: Histogram,
    pub verify_failures: IntCounter,
    pub downloads_completed: IntCounter,
    pub downloads_failed: IntCounter,
    pub download_duration: Histogram,
    pub files_shared: IntGauge,
    pub files_wanted: IntGauge,
    pub active_transfers: IntGauge,
    pub holders_dropped: IntCounter,
    pub requests_refused: IntCounterVec,
    pub holders_banned: IntCounterVec,
    pub versions_published: IntCounter,
    pub files_withdrawn: IntCounter,
    pub chunks_reused: IntCounter,
    pub haves_sent: IntCounter,
    pub haves_received: IntCounter,
    pub api_requests: IntCounterVec,
    pub api_bytes_sent: IntCounter,
    pub api_streams: IntGauge,
    pub tracker_requests: IntCounterVec,
    pub tracker_failovers: IntCounter,
    pub origin_bytes: IntCounter,
    pub origin_requests: IntCounter,
    pub origin_errors: IntCounterVec,
    pub mirror_requests: IntCounterVec,
    pub mirror_bytes: IntCounterVec,
    pub mirror_upstream_seconds: HistogramVec,
    pub mirror_verify_failures: IntCounter,
}

impl Default for PeerMetrics {
    fn default() -> Self {
        let r = process_registry();
        let secs = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let long = vec![
            0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
        ];
        PeerMetrics {
            chunks_downloaded: counter(
                &r,
                "shoal_peer_downloaded_chunks_total",
                "Chunks downloaded and verified.",
            ),
            chunks_uploaded: counter(
                &r,
                "shoal_peer_uploaded_chunks_total",
                "Chunks sent to other peers in full.",
            ),
            chunks_duplicate: counter(
                &r,
                "shoal_peer_duplicate_chunks_total",
                "Verified chunks received but already held (endgame duplicates); not counted as downloaded.",
            ),
            bytes_downloaded: counter(
                &r,
                "shoal_peer_downloaded_bytes_total",
                "Bytes of verified chunks downloaded.",
            ),
            bytes_uploaded: counter(
                &r,
                "shoal_peer_uploaded_bytes_total",
                "Bytes of chunks sent to other peers in full.",
            ),
            chunk_transfer_duration: histogram(
                &r,
                "shoal_peer_chunk_transfer_duration_seconds",
                "Time from sending a chunk request to holding the verified chunk.",
                secs.clone(),
            ),
            verify_failures: counter(
                &r,
                "shoal_peer_chunk_verify_failures_total",
                "Chunks received whose hash did not match (the holder is dropped for that file).",
            ),
            downloads_completed: counter(
                &r,
                "shoal_peer_downloads_completed_total",
                "Files downloaded in full and verified.",
            ),
            downloads_failed: counter(
                &r,
                "shoal_peer_downloads_failed_total",
                "Download attempts that ended in an error.",
            ),
            download_duration: histogram(
                &r,
                "shoal_peer_download_duration_seconds",
                "Time from starting a file download to its completion.",
                long,
            ),
            files_shared: gauge(
                &r,
                "shoal_peer_files_shared",
                "Files this peer holds in full and serves.",
            ),
            files_wanted: gauge(
                &r,
                "shoal_peer_files_wanted",
                "Files this peer is still fetching.",
            ),
            active_transfers: gauge(
                &r,
                "shoal_peer_active_transfers",
                "Chunk transfers in progress, both directions.",
            ),
            holders_dropped: counter(
                &r,
                "shoal_peer_holders_dropped_total",
                "Holders dropped by a download (dead, stalled or lying).",
            ),
            requests_refused: at_zero(
                counter_vec(
                    &r,
                    "shoal_peer_chunk_requests_refused_total",
                    "Chunk requests this peer refused, by error code (busy: upload slots full).",
                    &["reason"],
                ),
                ErrorCode::ALL.map(ErrorCode::as_str),
            ),
            holders_banned: at_zero(
                counter_vec(
                    &r,
                    "shoal_peer_holders_banned_total",
                    "Holders banned from a file for serving bad data, by reason (corrupt_chunk, wrong_header).",
                    &["reason"],
                ),
                BAN_REASONS,
            ),
            versions_published: counter(
                &r,
                "shoal_peer_versions_published_total",
                "Files and new versions of a name this peer began sharing from its own disk.",
            ),
            files_withdrawn: counter(
                &r,
                "shoal_peer_files_withdrawn_total",
                "File versions this peer stopped offering (deleted, replaced or changed on disk).",
            ),
            chunks_reused: counter(
                &r,
                "shoal_peer_chunks_reused_total",
                "Chunks of a download copied from a file already held here instead of fetched.",
            ),
            haves_sent: counter(
                &r,
                "shoal_peer_haves_sent_total",
                "Message 10 (have) replies this peer's chunk server sent: its held chunks, told to a downloader waiting for news.",
            ),
            haves_received: counter(
                &r,
                "shoal_peer_haves_received_total",
                "Message 10 (have) replies received from holders while downloading.",
            ),
            api_requests: api_requests(&r),
            api_bytes_sent: counter(
                &r,
                "shoal_api_bytes_sent_total",
                "File bytes sent to readers of the HTTP API.",
            ),
            api_streams: gauge(
                &r,
                "shoal_api_streams",
                "File bodies being sent over the HTTP API now.",
            ),
            tracker_requests: counter_vec(
                &r,
                "shoal_peer_tracker_requests_total",
                "Requests sent to each tracker, by outcome (ok, refused, unreachable).",
                &["tracker", "outcome"],
            ),
            tracker_failovers: counter(
                &r,
                "shoal_peer_tracker_failovers_total",
                "Tracker reads answered by another tracker than the file's first-ranked one (it was down, slow or did not know the file).",
            ),
            origin_bytes: counter(
                &r,
                "shoal_peer_origin_bytes_total",
                "Bytes of chunks fetched from the HTTP origin (SHOAL_ORIGIN).",
            ),
            origin_requests: counter(
                &r,
                "shoal_peer_origin_requests_total",
                "Requests sent to the HTTP origin (HEAD and range GET, retries included).",
            ),
            origin_errors: at_zero(
                counter_vec(
                    &r,
                    "shoal_peer_origin_errors_total",
                    "Failed origin requests, by kind (not_found, server_error, timeout, changed, connect).",
                    &["kind"],
                ),
                ORIGIN_ERROR_KINDS,
            ),
            mirror_requests: mirror_requests(&r),
            mirror_bytes: at_zero(
                counter_vec(
                    &r,
                    "shoal_peer_mirror_bytes_total",
                    "Bytes of registry blobs and manifests this peer fetched, by source (upstream: the upstream registry, peers: other peers).",
                    &["source"],
                ),
                MIRROR_SOURCES,
            ),
            mirror_upstream_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "shoal_peer_mirror_upstream_seconds",
                        "Time of the registry mirror's own requests to upstream, by request (check: HEAD before serving by digest, tag: a manifest by tag, base: GET /v2/).",
                    )
                    .buckets(secs),
                    &["request"],
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                // Exported from the start, like every labelled series here.
                for request in ["check", "tag", "base"] {
                    h.with_label_values(&[request]);
                }
                h
            },
            mirror_verify_failures: counter(
                &r,
                "shoal_peer_mirror_verify_failures_total",
                "Registry blobs and manifests whose bytes did not match their sha256 digest: the response was cut short and the data discarded.",
            ),
            registry: r,
        }
    }
}

/// The routes of the HTTP API, as the `route` label names them (never a file name).
pub const API_ROUTES: [&str; 5] = ["files", "file", "status", "mirror", "other"];
/// The status codes the HTTP API answers with.
pub const API_STATUSES: [u16; 10] = [200, 206, 304, 400, 404, 405, 416, 500, 502, 503];

/// HTTP API requests by route and status code, every pair present from the start.
fn api_requests(reg: &Registry) -> IntCounterVec {
    let requests = counter_vec(
        reg,
        "shoal_api_requests_total",
        "HTTP API requests answered, by route (files, file, status, other) and status code.",
        &["route", "status"],
    );
    for route in API_ROUTES {
        for status in API_STATUSES {
            requests.with_label_values(&[route, &status.to_string()]);
        }
    }
    requests
}
/// The kinds of registry mirror requests (src/peer/mirror/mod.rs).
pub const MIRROR_KINDS: [&str; 4] = ["base", "blob", "manifest_digest", "manifest_tag"];
/// Where the registry mirror's bytes came from.
const MIRROR_SOURCES: [&str; 2] = ["upstream", "peers"];
/// The status codes the registry mirror answers with most, present from the start.
const MIRROR_STATUSES: [u16; 11] = [200, 206, 304, 400, 401, 403, 404, 416, 500, 502, 503];

/// Registry mirror requests by kind and status code.
fn mirror_requests(reg: &Registry) -> IntCounterVec {
    let requests = counter_vec(
        reg,
        "shoal_peer_mirror_requests_total",
        "Registry mirror requests answered, by kind (base, blob, manifest_digest, manifest_tag) and status code.",
        &["kind", "status"],
    );
    for kind in MIRROR_KINDS {
        for status in MIRROR_STATUSES {
            requests.with_label_values(&[kind, &status.to_string()]);
        }
    }
    requests
}

/// The kinds of failed origin requests (src/peer/origin/http.rs).
const ORIGIN_ERROR_KINDS: [&str; 5] =
    ["not_found", "server_error", "timeout", "changed", "connect"];

/// The reasons the download engine bans a holder for (src/peer/download.rs).
const BAN_REASONS: [&str; 2] = ["corrupt_chunk", "wrong_header"];

/// Creates the series of every `reason` at zero, so an alert sees the first one rise.
fn at_zero<const N: usize>(counter: IntCounterVec, reasons: [&str; N]) -> IntCounterVec {
    for reason in reasons {
        counter.with_label_values(&[reason]);
    }
    counter
}

/// Counts one unit in a gauge for as long as it lives, so a cancelled task still gives its
/// unit back.
pub struct Active(IntGauge);

impl Active {
    pub fn new(gauge: &IntGauge) -> Active {
        gauge.inc();
        Active(gauge.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Readiness flag shared between the service and its `/readyz` endpoint.
#[derive(Clone, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `stop` fires, over TLS when `tls` is set.
pub async fn serve_http(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    registry: Registry,
    ready: Ready,
    stop: CancellationToken,
) {
    loop {
        let Some((stream, _)) = crate::connection::accept(&listener, &stop).await else {
            return;
        };
        let registry = registry.clone();
        let ready = ready.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let io = match http_stream(tls.as_deref(), HttpClients::Anyone, stream).await {
                Ok(io) => io,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics connection refused");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = respond(req.method(), req.uri().path(), &registry, &ready);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            if let Err(e) = tokio::time::timeout(HTTP_CONNECTION_TIME, conn)
                .await
                .unwrap_or(Ok(()))
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// How long one HTTP connection may last, TLS handshake included.
const HTTP_CONNECTION_TIME: Duration = Duration::from_secs(30);

/// An accepted HTTP connection ready for hyper: TLS when `tls` is set (admitting `clients`),
/// else clear text. Every HTTP endpoint serves its connections through this.
pub async fn http_stream(
    tls: Option<&Tls>,
    clients: HttpClients,
    stream: tokio::net::TcpStream,
) -> std::io::Result<TokioIo<Box<dyn crate::connection::Stream>>> {
    let stream: Box<dyn crate::connection::Stream> = match tls {
        Some(tls) => Box::new(
            tls.accept_http(stream, clients, HTTP_CONNECTION_TIME)
                .await?,
        ),
        None => Box::new(stream),
    };
    Ok(TokioIo::new(stream))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn respond(
    method: &Method,
    path: &str,
    registry: &Registry,
    ready: &Ready,
) -> Response<Full<Bytes>> {
    // Every endpoint only reads; hyper leaves the body out of a HEAD reply by itself.
    if method != Method::GET && method != Method::HEAD {
        let mut refused = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: these endpoints answer GET and HEAD only\n",
        );
        refused.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return refused;
    }
    match path {
        "/metrics" => {
            let mut out = Vec::new();
            let encoder = TextEncoder::new();
            if encoder.encode(&registry.gather(), &mut out).is_err() {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
            }
            Response::builder()
                .header("content-type", encoder.format_type())
                .body(Full::new(Bytes::from(out)))
                .expect("valid response")
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if ready.get() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

/// GETs `path` from a metrics endpoint and returns the status code (for the `health` command and
/// the container HEALTHCHECK, which have no curl in a scratch image). An unspecified listen ip
/// (`0.0.0.0`) is probed on loopback. With `tls`, the endpoint is dialled in TLS.
pub async fn probe(
    addr: SocketAddr,
    path: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<u16> {
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let stream: Box<dyn crate::connection::Stream> = match tls {
            Some(client) => Box::new(crate::tls::connect_http(client, stream).await?),
            None => Box::new(stream),
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let res = sender.send_request(req).await?;
        let status = res.status().as_u16();
        let _ = res.into_body().collect().await;
        anyhow::Ok(status)
    };
    tokio::time::timeout(Duration::from_secs(3), work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within 3s"))?
}
