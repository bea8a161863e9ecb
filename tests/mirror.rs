//! The registry mirror with real parts: a tracker, node agents with `SHOAL_REGISTRY_UPSTREAM`,
//! Debian's `docker-registry` as upstream and `skopeo` pulling through a `registries.conf`
//! mirror entry. Pulled images match upstream's digests, agents pulling at once make upstream
//! send each blob about once, tags are never cached, a digest upstream lacks is a fast 404, a
//! tampered blob is never served complete, and a private blob needs the client's own
//! upstream credentials.

mod common;

use base64::Engine;
use bytes::Bytes;
use common::registry::{
    build_image, mirror_registries_conf, read_layout, sha256_digest, skopeo, skopeo_pull, Image,
    Registry, TamperProxy, MANIFEST_ACCEPT,
};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

const KIB: usize = 1 << 10;

/// A node agent with the API on an ephemeral port, mirroring `upstream` (a
/// `SHOAL_REGISTRY_UPSTREAM` value; `None`: unset).
fn agent(tracker: SocketAddr, dir: &Path, upstream: Option<&str>) -> Proc {
    let mut env = vec![("SHOAL_API_ADDR", "127.0.0.1:0")];
    if let Some(upstream) = upstream {
        env.push(("SHOAL_REGISTRY_UPSTREAM", upstream));
    }
    let p = daemon(tracker, dir, "agent", &env);
    assert!(p.api.is_some(), "the start-up line gives the API address");
    p
}

/// A registry holding `layers` (sizes) as `name:tag`, or `None` when the tools are missing.
fn registry_with(
    dir: &Path,
    name: &str,
    tag: &str,
    layers: &[usize],
    seed: u64,
) -> Option<(Registry, Image)> {
    let registry = Registry::start()?;
    let layout = dir.join(format!("layout-{seed}"));
    let image = build_image(&layout, layers, seed);
    registry.push(&layout, name, tag);
    Some((registry, image))
}

/// `skopeo copy` of `reference` through the mirror at `api`, into `out`; panics with skopeo's
/// words if it fails.
fn pull_through(
    dir: &Path,
    upstream_host: &str,
    api: SocketAddr,
    reference: &str,
    out: &Path,
    extra: &[&str],
) {
    std::fs::create_dir_all(dir).unwrap();
    let conf = mirror_registries_conf(dir, upstream_host, api);
    let done = if extra.is_empty() {
        skopeo_pull(&conf, reference, out)
    } else {
        let mut args = vec![
            "--registries-conf",
            conf.to_str().unwrap(),
            "copy",
            "--src-tls-verify=false",
        ];
        args.extend_from_slice(extra);
        let (from, to) = (
            format!("docker://{reference}"),
            format!("oci:{}:image", out.display()),
        );
        args.push(&from);
        args.push(&to);
        skopeo(&args)
    };
    assert!(
        done.status.success(),
        "skopeo through the mirror failed:\n{}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// Blob requests an agent's mirror answered with 200.
fn blobs_served(agent: &Proc) -> f64 {
    agent.metric(r#"shoal_peer_mirror_requests_total{kind="blob",status="200"}"#)
}

#[test]
fn agents_pulling_at_once_get_upstreams_image_with_each_blob_sent_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let layers = [1024 * KIB, 2048 * KIB, 300 * KIB];
    let Some((registry, image)) = registry_with(dir.path(), "team/app/api", "v1", &layers, 1)
    else {
        return;
    };
    let tracker = tracker(&[]);
    let upstream = registry.url();
    let agents: Vec<Proc> = (0..3)
        .map(|i| {
            agent(
                tracker.addr,
                &dir.path().join(format!("agent{i}")),
                Some(&upstream),
            )
        })
        .collect();
    let reference = format!("{}/team/app/api:v1", registry.host());
    let wanted = &image;
    std::thread::scope(|s| {
        for (i, a) in agents.iter().enumerate() {
            let (root, reference, host) = (dir.path(), &reference, registry.host());
            let api = a.api.unwrap();
            s.spawn(move || {
                let out = root.join(format!("pulled{i}"));
                pull_through(
                    &root.join(format!("client{i}")),
                    &host,
                    api,
                    reference,
                    &out,
                    &[],
                );
                assert_eq!(&read_layout(&out), wanted, "client {i} got another image");
            });
        }
    });
    let blobs = image.blobs().len() as f64;
    for a in &agents {
        assert!(
            blobs_served(a) >= blobs,
            "skopeo went around the mirror:\n{}",
            a.metrics_text()
        );
    }
    // The registry logs a request just after answering it.
    let total: u64 = image.blobs().iter().map(|b| b.size).sum();
    let sent = || -> u64 {
        image
            .blobs()
            .iter()
            .map(|b| registry.blob_served(&b.digest).bytes)
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(10), || sent() >= total),
        "{:?}",
        registry.accesses()
    );
    for blob in image.blobs() {
        let served = registry.blob_served(&blob.digest);
        assert!(
            served.bytes as f64 <= blob.size as f64 * 1.2,
            "upstream sent {} bytes of {} ({} bytes)",
            served.bytes,
            blob.digest,
            blob.size
        );
    }
    let metric = |source: &str| -> f64 {
        let sample = format!(r#"shoal_peer_mirror_bytes_total{{source="{source}"}}"#);
        agents.iter().map(|a| a.metric(&sample)).sum()
    };
    assert!(
        metric("upstream") <= total as f64 * 1.2,
        "{}",
        metric("upstream")
    );
    assert!(metric("peers") > 0.0, "no agent got a byte from another");
}

#[test]
fn a_tag_moved_upstream_is_seen_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some((registry, first)) = registry_with(dir.path(), "app", "latest", &[64 * KIB], 1) else {
        return;
    };
    let tracker = tracker(&[]);
    let node = agent(
        tracker.addr,
        &dir.path().join("agent"),
        Some(&registry.url()),
    );
    let api = node.api.unwrap();
    let tag = |method: &str| {
        http(
            api,
            method,
            "/v2/app/manifests/latest",
            &[("Accept", MANIFEST_ACCEPT)],
        )
    };
    let before = tag("GET");
    assert_eq!(before.status, 200);
    assert_eq!(
        before.header("docker-content-digest"),
        Some(first.manifest.digest.as_str())
    );
    assert_eq!(sha256_digest(&before.body), first.manifest.digest);

    let layout = dir.path().join("second");
    let second = build_image(&layout, &[64 * KIB], 2);
    registry.push(&layout, "app", "latest");
    let after = tag("HEAD");
    assert_eq!(after.status, 200);
    assert_eq!(
        after.header("docker-content-digest"),
        Some(second.manifest.digest.as_str())
    );
    assert_eq!(
        after.header("content-length"),
        Some(second.manifest.size.to_string().as_str())
    );
    assert!(after
        .header("content-type")
        .is_some_and(|t| t.contains("manifest")));

    // By digest, the manifest goes through the swarm with upstream's content type.
    let path = format!("/v2/app/manifests/{}", second.manifest.digest);
    let by_digest = http(api, "GET", &path, &[("Accept", MANIFEST_ACCEPT)]);
    assert_eq!(by_digest.status, 200);
    assert_eq!(sha256_digest(&by_digest.body), second.manifest.digest);
    assert_eq!(
        by_digest.header("content-type"),
        after.header("content-type")
    );
    assert_eq!(
        by_digest.header("etag"),
        Some(format!("\"{}\"", second.manifest.digest).as_str())
    );
}

#[test]
fn a_digest_upstream_lacks_is_a_fast_404_and_unknown_upstreams_are_never_asked() {
    let dir = tempfile::tempdir().unwrap();
    let Some((registry, image)) = registry_with(dir.path(), "library/alpine", "3", &[64 * KIB], 1)
    else {
        return;
    };
    let tracker = tracker(&[]);
    let aliased = format!("docker.io={}", registry.url());
    let node = agent(tracker.addr, &dir.path().join("agent"), Some(&aliased));
    let api = node.api.unwrap();
    let missing = format!("sha256:{}", "0".repeat(64));

    let blob = http(
        api,
        "GET",
        &format!("/v2/library/alpine/blobs/{missing}?ns=docker.io"),
        &[],
    );
    assert_eq!(blob.status, 404);
    assert_eq!(blob.json()["errors"][0]["code"], "BLOB_UNKNOWN");
    let manifest = http(
        api,
        "GET",
        &format!("/v2/library/alpine/manifests/{missing}"),
        &[],
    );
    assert_eq!(manifest.status, 404);
    assert_eq!(manifest.json()["errors"][0]["code"], "MANIFEST_UNKNOWN");
    // One upstream request each: no retries, no pull started.
    let asked = || registry.blob_served(&missing).heads + registry.manifest_served(&missing).heads;
    assert!(wait_until(Duration::from_secs(10), || asked() >= 2));
    let all = registry.accesses();
    let about_it: Vec<_> = all.iter().filter(|a| a.path.ends_with(&missing)).collect();
    assert_eq!(about_it.len(), 2, "{about_it:?}");
    assert_eq!(node.metric("shoal_peer_origin_requests_total"), 0.0);

    // An ns that names no configured upstream is refused without asking anyone.
    let before = registry.accesses().len();
    let layer = &image.layers[0].digest;
    let elsewhere = http(
        api,
        "GET",
        &format!("/v2/library/alpine/blobs/{layer}?ns=evil.example"),
        &[],
    );
    assert_eq!(elsewhere.status, 404);
    assert_eq!(elsewhere.json()["errors"][0]["code"], "NAME_UNKNOWN");
    // By its host, the aliased upstream is known too.
    let by_host = format!("/v2/library/alpine/blobs/{layer}?ns={}", registry.host());
    let found = http(api, "GET", &by_host, &[]);
    assert_eq!(found.status, 200);
    assert_eq!(sha256_digest(&found.body), *layer);
    assert!(wait_until(Duration::from_secs(10), || registry
        .blob_served(layer)
        .gets
        > 0));
    let new: Vec<_> = registry.accesses().into_iter().skip(before).collect();
    assert!(
        new.iter().all(|a| a.path.ends_with(layer.as_str())),
        "{new:?}"
    );

    // Without any upstream, names are unknown, and /v2/ still answers.
    let bare = agent(tracker.addr, &dir.path().join("bare"), None);
    let bare_api = bare.api.unwrap();
    let base = http(bare_api, "GET", "/v2/", &[]);
    assert_eq!(base.status, 200);
    assert_eq!(
        base.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    let none = http(
        bare_api,
        "GET",
        &format!("/v2/library/alpine/blobs/{layer}"),
        &[],
    );
    assert_eq!(none.status, 404);
    assert_eq!(none.json()["errors"][0]["code"], "NAME_UNKNOWN");
}

#[test]
fn a_tampered_blob_is_cut_short_discarded_and_fetched_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let Some((registry, image)) = registry_with(dir.path(), "app", "v1", &[512 * KIB], 1) else {
        return;
    };
    let layer = image.layers[0].clone();
    let proxy = TamperProxy::start(registry.addr, &layer.digest);
    let tracker = tracker(&[]);
    let data = dir.path().join("agent");
    let node = agent(tracker.addr, &data, Some(&proxy.url()));
    let api = node.api.unwrap();
    let path = format!("/v2/app/blobs/{}", layer.digest);
    let name = format!("oci/sha256/{}", &layer.digest["sha256:".len()..]);

    let bad = http(api, "GET", &path, &[]);
    assert_eq!(
        bad.status, 200,
        "the check passes: the headers are upstream's"
    );
    assert!(proxy.tampered() > 0);
    assert!(
        (bad.body.len() as u64) < layer.size,
        "a tampered blob came out whole ({} bytes)",
        bad.body.len()
    );
    let metric = "shoal_peer_mirror_verify_failures_total";
    assert!(wait_until(Duration::from_secs(10), || node.metric(metric) == 1.0));
    let gone = wait_until(Duration::from_secs(20), || {
        !data.join(&name).exists() && !file_names(tracker.addr).contains(&name)
    });
    assert!(
        gone,
        "the bad copy is still held or listed:\n{}",
        node.log_text()
    );
    // A range is checked against the whole blob too (the blob is pulled again for it).
    let range = http(api, "GET", &path, &[("Range", "bytes=0-99")]);
    assert!(range.body.len() < 100, "a tampered range came out whole");
    assert!(wait_until(Duration::from_secs(10), || node.metric(metric) == 2.0));
    let gone = wait_until(Duration::from_secs(20), || {
        !data.join(&name).exists() && !file_names(tracker.addr).contains(&name)
    });
    assert!(gone, "the second bad copy is still held or listed");

    proxy.retarget("");
    let good = http(api, "GET", &path, &[]);
    assert_eq!(good.status, 200);
    assert!(good.error.is_none(), "{}", node.log_text());
    assert!(
        sha256_digest(&good.body) == layer.digest,
        "{} bytes {}",
        good.body.len(),
        node.log_text()
    );
    let range = http(api, "GET", &path, &[("Range", "bytes=100-199")]);
    assert_eq!(range.status, 206);
    assert_eq!(
        range.header("content-range"),
        Some(format!("bytes 100-199/{}", layer.size).as_str())
    );
    assert!(range.body == good.body[100..200], "{}", node.log_text());
}

#[test]
fn a_private_blob_needs_the_clients_own_upstream_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let Some((registry, image)) = registry_with(dir.path(), "team/private", "v1", &[256 * KIB], 1)
    else {
        return;
    };
    let realm = TokenRealm::start(registry.addr);
    let tracker = tracker(&[]);
    let node = agent(tracker.addr, &dir.path().join("agent"), Some(&realm.url()));
    let api = node.api.unwrap();
    let layer = &image.layers[0].digest;
    let path = format!("/v2/team/private/blobs/{layer}");

    // Anonymous: upstream's challenge, passed on by /v2/ and by the blob itself.
    for asked in ["/v2/", path.as_str()] {
        let reply = http(api, "GET", asked, &[]);
        assert_eq!(reply.status, 401, "{asked}");
        let challenge = reply.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=") && challenge.contains("/token"),
            "{challenge}"
        );
    }
    // skopeo follows the challenge to the realm with its credentials (which it looks up by the
    // mirror's address) and pulls through the agent.
    let out = dir.path().join("pulled");
    let reference = format!("{}/team/private:v1", realm.host());
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let auths = serde_json::json!({ "auths": { api.to_string(): { "auth": basic } } });
    let authfile = dir.path().join("auth.json");
    std::fs::write(&authfile, auths.to_string()).unwrap();
    let authfile = format!("--src-authfile={}", authfile.display());
    pull_through(
        &dir.path().join("client"),
        &realm.host(),
        api,
        &reference,
        &out,
        &[&authfile],
    );
    assert_eq!(read_layout(&out), image);
    assert!(
        blobs_served(&node) >= image.blobs().len() as f64,
        "{}",
        node.metrics_text()
    );

    // The layer is in the swarm now, and still nobody gets it without credentials.
    let anonymous = http(api, "GET", &path, &[]);
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.json()["errors"][0]["code"], "UNAUTHORIZED");
    let wrong = http(api, "GET", &path, &[("Authorization", "Bearer forged")]);
    assert_eq!(wrong.status, 401);
    let bearer = format!("Bearer {TOKEN}");
    let allowed = http(api, "GET", &path, &[("Authorization", &bearer)]);
    assert_eq!(allowed.status, 200);
    assert_eq!(sha256_digest(&allowed.body), *layer);
}

const USER: &str = "reader";
const PASSWORD: &str = "open-sesame";
const TOKEN: &str = "token-for-reader";

/// A registry that wants a bearer token, Docker Hub style: requests without `Bearer TOKEN` get
/// `401` with a challenge naming the realm `/token`, which gives the token for `USER:PASSWORD`
/// (basic auth) only; everything else is passed to the registry behind. On its own runtime,
/// on 127.0.0.1 port 0, stopped when dropped.
struct TokenRealm {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TokenRealm {
    fn start(registry: SocketAddr) -> TokenRealm {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| async move {
                        Ok::<_, std::convert::Infallible>(guard(addr, registry, req).await)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenRealm {
            addr,
            runtime: Some(runtime),
        }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TokenRealm {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn answer(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn guard(
    me: SocketAddr,
    registry: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if req.uri().path() == "/token" {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        if auth != format!("Basic {basic}") {
            return answer(
                StatusCode::UNAUTHORIZED,
                r#"{"details":"bad credentials"}"#.into(),
            );
        }
        return answer(
            StatusCode::OK,
            format!(r#"{{"token":"{TOKEN}","access_token":"{TOKEN}"}}"#),
        );
    }
    if auth != format!("Bearer {TOKEN}") {
        let mut r = answer(
            StatusCode::UNAUTHORIZED,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.into(),
        );
        let challenge = format!(
            r#"Bearer realm="http://{me}/token",service="shoal-test",scope="repository:team/private:pull""#
        );
        r.headers_mut()
            .insert("www-authenticate", challenge.parse().unwrap());
        return r;
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let req = Request::from_parts(parts, Full::new(body));
    let bad_gateway = || answer(StatusCode::BAD_GATEWAY, "registry unreachable".into());
    let Ok(stream) = TcpStream::connect(registry).await else {
        return bad_gateway();
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return bad_gateway();
    };
    tokio::spawn(conn);
    let Ok(answered) = sender.send_request(req).await else {
        return bad_gateway();
    };
    let (parts, body) = answered.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Response::from_parts(parts, Full::new(body))
}
