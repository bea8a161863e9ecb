//! The read side of the OCI Distribution API on the node's HTTP API, so container runtimes
//! pull through the swarm: `GET /v2/`, `GET|HEAD /v2/{name}/blobs/{digest}` and
//! `/v2/{name}/manifests/{reference}`. Objects by digest are swarm files named after the digest
//! alone (`oci/sha256/{hex}`), pulled from upstream through the origin machinery when no peer
//! has them and checked against the digest as they go out ([`verify`]). Upstream is asked first
//! whether this client may read the object (its `Authorization` forwarded), so nobody reads
//! through a node what upstream would not give them. Manifests by tag always come from
//! upstream. docs/API.md is the reference.

mod path;
mod upstream;
mod verify;

pub use upstream::Upstreams;

use super::api::stream::{self, Body, Wanted};
use super::origin::{self, Failure};
use super::transfers::WantError;
use super::Peer;
use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use path::{parse, Digest, Kind, Target};
use sha2::{Digest as _, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};
use upstream::Upstream;

/// Where the swarm names registry objects: the digest alone, so that a blob shared by several
/// repositories or registries is one swarm file.
const NAME_PREFIX: &str = "oci/sha256/";
/// A manifest or error body larger than this from upstream is refused (OCI caps manifests at
/// 4 MiB).
const MAX_PROXIED_BYTES: usize = 4 * 1024 * 1024;
/// The mirror's own requests to upstream (checks, tags, `/v2/`) must answer within this time.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// `Docker-Distribution-API-Version`.
const API_VERSION: &str = "registry/2.0";
/// The request headers passed on to upstream.
const FORWARDED: [HeaderName; 2] = [header::AUTHORIZATION, header::ACCEPT];
/// The answer headers passed on to the client.
const PASSED_ON: [&str; 5] = [
    "content-type",
    "docker-content-digest",
    "etag",
    "www-authenticate",
    "content-length",
];

impl Peer {
    /// Counts bytes of a registry object fetched from `from` (`upstream` or `peers`).
    pub fn count_fetched(&self, name: &str, from: &str, bytes: usize) {
        if name.starts_with(NAME_PREFIX) {
            self.metrics
                .mirror_bytes
                .with_label_values(&[from])
                .inc_by(bytes as u64);
        }
    }
}

/// Answers a request under `/v2`.
pub async fn handle(peer: &Arc<Peer>, req: &Request<Incoming>) -> Response<Body> {
    let (kind, response) = match parse(req.uri().path()) {
        Ok(target) => (target.kind, answer(peer, req, &target).await),
        Err((status, code, why)) => (Kind::Base, oci_error(status, code, why)),
    };
    let code = response.status().as_u16().to_string();
    peer.metrics
        .mirror_requests
        .with_label_values(&[kind.label(), &code])
        .inc();
    response
}

async fn answer(peer: &Arc<Peer>, req: &Request<Incoming>, target: &Target<'_>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = oci_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this mirror is read-only: GET and HEAD only",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let upstreams = peer.mirror.as_ref();
    let ns = query_value(req.uri().query(), "ns");
    let upstream = match upstreams.and_then(|u| u.pick(ns.as_deref())) {
        Some(u) => u,
        None if target.kind == Kind::Base => return base_answer(),
        None if upstreams.is_some_and(|u| !u.is_empty()) => {
            let why = format!(
                "no upstream registry is configured for ns={:?}",
                ns.unwrap_or_default()
            );
            return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", why);
        }
        None => {
            let why = "no upstream registry is configured (SHOAL_REGISTRY_UPSTREAM)";
            return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", why);
        }
    };
    match target.kind {
        Kind::Base => base(peer, req, upstream).await,
        Kind::ManifestTag => tag(peer, req, upstream, target).await,
        Kind::Blob | Kind::ManifestDigest => content(peer, req, upstream, target).await,
    }
}

fn base_answer() -> Response<Body> {
    Response::builder()
        .header("docker-distribution-api-version", API_VERSION)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::whole(&b"{}\n"[..]))
        .expect("valid response")
}

/// `GET /v2/`: 200, or upstream's 401 and its challenge, so that clients that look here first
/// learn where to get a token.
async fn base(peer: &Peer, req: &Request<Incoming>, upstream: &Upstream) -> Response<Body> {
    let asked = ask(peer, req, upstream, "/v2/".into(), Method::GET, "base").await;
    match asked {
        Ok((StatusCode::UNAUTHORIZED, headers, _)) => {
            let mut r = oci_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "upstream asks for authentication",
            );
            pass_on(&headers, r.headers_mut(), &["www-authenticate"]);
            r
        }
        _ => base_answer(),
    }
}

/// A manifest by tag: always upstream's answer of now, passed on.
async fn tag(
    peer: &Peer,
    req: &Request<Incoming>,
    upstream: &Upstream,
    target: &Target<'_>,
) -> Response<Body> {
    let method = req.method().clone();
    let asked = ask(peer, req, upstream, target.upstream_path(), method, "tag").await;
    let (status, headers, body) = match asked {
        Ok(answer) => answer,
        Err(failure) => return unreachable_upstream(upstream, &failure),
    };
    if status.is_server_error() {
        return bad_gateway(upstream, status);
    }
    let mut r = Response::builder()
        .status(status)
        .header("docker-distribution-api-version", API_VERSION)
        .body(if req.method() == Method::HEAD {
            Body::empty()
        } else {
            Body::whole(body)
        })
        .expect("valid response");
    pass_on(&headers, r.headers_mut(), &PASSED_ON);
    r
}

/// A blob or a manifest by digest: upstream says whether this client may read it and what it
/// is; the bytes come through the swarm.
async fn content(
    peer: &Arc<Peer>,
    req: &Request<Incoming>,
    upstream: &Upstream,
    target: &Target<'_>,
) -> Response<Body> {
    let digest = Digest::parse(target.reference).expect("parsed");
    let path = target.upstream_path();
    let checked = ask(peer, req, upstream, path.clone(), Method::HEAD, "check").await;
    let (status, headers, _) = match checked {
        Ok(answer) => answer,
        Err(failure) => return unreachable_upstream(upstream, &failure),
    };
    if !status.is_success() {
        return refused(upstream, status, &headers, target);
    }
    let said = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(other) = said("docker-content-digest").filter(|d| *d != target.reference) {
        let why = format!(
            "upstream {} answered digest {other} for {digest}",
            upstream.base.host_port()
        );
        return oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", why);
    }
    let Some(size) = said("content-length").and_then(|l| l.parse::<u64>().ok()) else {
        let why = format!(
            "upstream {} gave no Content-Length for {digest}",
            upstream.base.host_port()
        );
        return oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", why);
    };
    let etag = format!("\"{digest}\"");
    let content_type = match target.kind {
        Kind::Blob => "application/octet-stream",
        _ => said("content-type").unwrap_or("application/octet-stream"),
    };
    let mut head = Response::builder()
        .header("docker-distribution-api-version", API_VERSION)
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, &etag)
        .header(header::CONTENT_TYPE, content_type);
    if target.kind == Kind::Blob {
        head = head.header(header::ACCEPT_RANGES, "bytes");
    }
    if matches_etag(req, &etag) {
        return head
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("valid response");
    }
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .filter(|_| target.kind == Kind::Blob);
    let (first, last) = match stream::wanted(range, size) {
        Wanted::Unsatisfiable => {
            let why = format!("the range {range:?} lies outside the blob's {size} bytes");
            let mut r = oci_error(StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UNKNOWN", why);
            let all = HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii");
            r.headers_mut().insert(header::CONTENT_RANGE, all);
            return r;
        }
        Wanted::Part(first, last) => {
            head = head.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {first}-{last}/{size}"),
            );
            (first, last)
        }
        Wanted::Whole => (0, size.saturating_sub(1)),
    };
    let len = if size == 0 { 0 } else { last - first + 1 };
    let head = head.header(header::CONTENT_LENGTH, len);
    if req.method() == Method::HEAD || size == 0 {
        return match size == 0 && Sha256::digest([]).as_slice() != digest.bytes() {
            true => oci_error(
                StatusCode::BAD_GATEWAY,
                "UNKNOWN",
                format!("upstream says {digest} is empty, which is not its digest"),
            ),
            false => head.body(Body::empty()).expect("valid response"),
        };
    }
    let name = format!("{NAME_PREFIX}{}", digest.hex());
    peer.origin.route(&name, source(req, upstream, path));
    let transfer = match peer.want(&name, None).await {
        Ok(t) => t,
        Err(e) => return want_failed(&e, target),
    };
    let shape = match transfer.ready().await {
        Ok(shape) => shape,
        Err(e) => {
            let why = format!("cannot get {digest}: {e}");
            return oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", why);
        }
    };
    if shape.0 != size {
        let why = format!(
            "the swarm holds {} bytes under {digest}, upstream {size}",
            shape.0
        );
        return oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", why);
    }
    let body = verify::body(peer, transfer, shape, digest, (first, last));
    head.body(body).expect("valid response")
}

/// `path` at upstream, asked with this client's credentials and `Accept` (pulls of the object
/// too: a registry may hide a manifest from a client that does not accept its type).
fn source(req: &Request<Incoming>, upstream: &Upstream, path: String) -> origin::Source {
    let mut source = upstream.base.at(path);
    for name in FORWARDED {
        if let Some(value) = req.headers().get(&name) {
            source = source.with_header(name, value.clone());
        }
    }
    source
}

/// One request of the mirror's own to upstream, with the client's credentials and `Accept`.
async fn ask(
    peer: &Peer,
    req: &Request<Incoming>,
    upstream: &Upstream,
    path: String,
    method: Method,
    label: &str,
) -> Result<(StatusCode, HeaderMap, Bytes), Failure> {
    let source = source(req, upstream, path);
    let started = Instant::now();
    let answer = origin::exchange(&source, method, MAX_PROXIED_BYTES, UPSTREAM_TIMEOUT).await;
    peer.metrics
        .mirror_upstream_seconds
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    answer
}

/// Upstream's refusal passed on: 401 with its challenge, 403, 404 at once, 5xx as 502.
fn refused(
    upstream: &Upstream,
    status: StatusCode,
    headers: &HeaderMap,
    target: &Target<'_>,
) -> Response<Body> {
    let host = upstream.base.host_port();
    let (code, why) = match status {
        StatusCode::UNAUTHORIZED => (
            "UNAUTHORIZED",
            format!("upstream {host} asks for authentication"),
        ),
        StatusCode::FORBIDDEN => ("DENIED", format!("upstream {host} denies access")),
        StatusCode::NOT_FOUND => (
            target.kind.unknown(),
            format!(
                "upstream {host} does not have {} in {}",
                target.reference, target.name
            ),
        ),
        StatusCode::TOO_MANY_REQUESTS => (
            "TOOMANYREQUESTS",
            format!("upstream {host} asks to slow down"),
        ),
        s if s.is_server_error() => return bad_gateway(upstream, s),
        s => ("UNKNOWN", format!("upstream {host} answered {s}")),
    };
    let mut r = oci_error(status, code, why);
    pass_on(headers, r.headers_mut(), &["www-authenticate"]);
    r
}

fn bad_gateway(upstream: &Upstream, status: StatusCode) -> Response<Body> {
    let why = format!("upstream {} failed: {status}", upstream.base.host_port());
    oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", why)
}

fn unreachable_upstream(upstream: &Upstream, failure: &Failure) -> Response<Body> {
    let why = format!(
        "upstream {} did not answer: {failure}",
        upstream.base.host_port()
    );
    oci_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", why)
}

fn want_failed(e: &WantError, target: &Target<'_>) -> Response<Body> {
    let (status, code) = match e {
        WantError::NotFound(_) => (StatusCode::NOT_FOUND, target.kind.unknown()),
        WantError::Tracker(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        WantError::BadName(_) | WantError::Other(_) => (StatusCode::BAD_GATEWAY, "UNKNOWN"),
    };
    oci_error(status, code, e.to_string())
}

fn pass_on(from: &HeaderMap, to: &mut HeaderMap, names: &[&'static str]) {
    for &name in names {
        for value in from.get_all(name) {
            to.append(HeaderName::from_static(name), value.clone());
        }
    }
}

/// An error in the OCI format: `{"errors":[{"code":..,"message":..}]}`.
fn oci_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message.into() }] });
    let mut body = serde_json::to_vec(&body).expect("serialisable");
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("docker-distribution-api-version", API_VERSION)
        .body(Body::whole(body))
        .expect("valid response")
}

/// The value of `key` in a query string, percent-decoded.
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let value = pair.strip_prefix(key)?.strip_prefix('=')?;
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .ok()?;
        Some(value.into_owned())
    })
}

/// Whether `If-None-Match` names this ETag (or `*`).
fn matches_etag(req: &Request<Incoming>, etag: &str) -> bool {
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}
