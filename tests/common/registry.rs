//! A real OCI registry for the mirror tests: Debian's `docker-registry` on 127.0.0.1 port 0 with
//! its access log in a file, small images built as OCI layouts on disk and pushed with `skopeo`,
//! a proxy that tampers with one blob's bytes on the way, and `skopeo` pulls through a mirror.

use super::{http, make_file, wait_until};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// The manifest media type of the images built here.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The `Accept` header a pulling client sends for manifests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// How long one `skopeo` run may take before it is killed.
const SKOPEO_LIMIT: &str = "120";

/// Whether the tools `(command, Debian package)` are installed. A missing one skips the test
/// with a printed reason, except in CI (`CI` set) where it fails it.
pub fn tools_present(tools: &[(&str, &str)]) -> bool {
    for (tool, package) in tools {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            assert!(
                std::env::var("CI").is_err(),
                "{tool} is required in CI: apt-get install {package}"
            );
            eprintln!("{tool} not installed (apt-get install {package}): skipping this test");
            return false;
        }
    }
    true
}

/// One blob of an image: its `sha256:` digest and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// The digests of an image: its manifest, config and layers (in manifest order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl Image {
    /// The config and the layers: everything a pull fetches by digest besides the manifest.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config).chain(&self.layers).collect()
    }
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Stores `data` as a blob of the OCI layout `dir`.
fn write_blob(dir: &Path, data: &[u8]) -> Blob {
    let digest = sha256_digest(data);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(&digest["sha256:".len()..]), data).unwrap();
    Blob {
        digest,
        size: data.len() as u64,
    }
}

/// A layer: a gzip'd tar holding one file of `len` pseudo-random (incompressible) bytes, so the
/// blob is about `len` long. Returns the blob and the digest of the uncompressed tar (its diff id).
fn write_layer(dir: &Path, index: usize, len: usize, seed: u64) -> (Blob, String) {
    let scratch = tempfile::tempdir().unwrap();
    let content = make_file(scratch.path(), "content", len, seed);
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_path_with_name(&content, format!("shoal-layer-{index}.bin"))
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    (write_blob(dir, &gz.finish().unwrap()), sha256_digest(&tar))
}

/// The OCI platform architecture of this machine, so a runtime pulling the image accepts it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Builds an OCI image layout in `dir` (created if needed): one gzip'd tar layer per entry of
/// `layer_sizes` (bytes of random content), a config and a manifest. Images built with other
/// `seed`s have other layers.
pub fn build_image(dir: &Path, layer_sizes: &[usize], seed: u64) -> Image {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, len) in layer_sizes.iter().enumerate() {
        let (blob, diff_id) = write_layer(dir, i, *len, seed * 1000 + i as u64);
        layers.push(blob);
        diff_ids.push(diff_id);
    }
    let config = json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = write_blob(dir, config.to_string().as_bytes());
    let descriptor = |media: &str, blob: &Blob| json!({"mediaType": media, "digest": blob.digest, "size": blob.size});
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers
            .iter()
            .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l))
            .collect::<Vec<_>>(),
    });
    let manifest = write_blob(dir, manifest.to_string().as_bytes());
    let mut entry = descriptor(OCI_MANIFEST, &manifest);
    entry["annotations"] = json!({"org.opencontainers.image.ref.name": "image"});
    let index = json!({"schemaVersion": 2, "manifests": [entry]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    Image {
        manifest,
        config,
        layers,
    }
}

/// Reads the image of the OCI layout `dir` (the first manifest of its index), checking that every
/// blob it names is present with the size it says and hashes to its digest.
pub fn read_layout(dir: &Path) -> Image {
    let blob = |d: &Value| {
        let digest = d["digest"].as_str().expect("descriptor digest").to_string();
        let path = dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            sha256_digest(&data),
            digest,
            "{} is corrupt",
            path.display()
        );
        assert_eq!(Some(data.len() as u64), d["size"].as_u64(), "{digest} size");
        (
            Blob {
                digest,
                size: data.len() as u64,
            },
            data,
        )
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let (manifest, body) = blob(&index["manifests"][0]);
    let body: Value = serde_json::from_slice(&body).unwrap();
    let layers = body["layers"].as_array().expect("layers");
    Image {
        manifest,
        config: blob(&body["config"]).0,
        layers: layers.iter().map(|l| blob(l).0).collect(),
    }
}

/// Runs `skopeo ARGS` (killed after [`SKOPEO_LIMIT`] seconds).
pub fn skopeo(args: &[&str]) -> Output {
    Command::new("timeout")
        .args([
            "--kill-after=5",
            SKOPEO_LIMIT,
            "skopeo",
            "--insecure-policy",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("timeout and skopeo run")
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a `registries.conf` in `dir` that sends pulls of `upstream` (`host:port`) to the
/// mirror at `mirror` first, both over plain HTTP.
pub fn mirror_registries_conf(dir: &Path, upstream: &str, mirror: SocketAddr) -> PathBuf {
    let conf = format!(
        "[[registry]]\nprefix = \"{upstream}\"\nlocation = \"{upstream}\"\ninsecure = true\n\n\
         [[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
    );
    let path = dir.join("registries.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

/// `skopeo copy docker://REFERENCE oci:OUT:image` with the registries of `conf` (see
/// [`mirror_registries_conf`]): how the run ended. Read the result with [`read_layout`].
pub fn skopeo_pull(conf: &Path, reference: &str, out: &Path) -> Output {
    skopeo(&[
        "--registries-conf",
        conf.to_str().unwrap(),
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:image", out.display()),
    ])
}

/// One line of the registry's access log.
#[derive(Debug, Clone)]
pub struct Access {
    pub method: String,
    /// The request path without its query.
    pub path: String,
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
}

/// What the registry sent for one blob or manifest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub gets: usize,
    pub heads: usize,
    /// Body bytes sent to GETs.
    pub bytes: u64,
}

/// Parses an access log line in the combined format:
/// `127.0.0.1 - - [date] "GET /v2/a/blobs/sha256:.. HTTP/1.1" 200 1234 "referer" "agent"`.
fn parse_access(line: &str) -> Option<Access> {
    let (_, rest) = line.split_once(" \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut request = request.split(' ');
    let method = request.next()?.to_string();
    let target = request.next()?;
    let path = target.split('?').next()?.to_string();
    let mut numbers = rest.split(' ');
    let status = numbers.next()?.parse().ok()?;
    let bytes = numbers.next()?.parse().unwrap_or(0);
    Some(Access {
        method,
        path,
        status,
        bytes,
    })
}

/// Debian's `docker-registry` serving a fresh filesystem store on 127.0.0.1 port 0; killed
/// (and its store removed) when dropped.
pub struct Registry {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry and waits until `GET /v2/` answers 200. `None` (with a printed reason)
    /// when `docker-registry` or `skopeo` is not installed, outside CI.
    pub fn start() -> Option<Registry> {
        let tools = [("docker-registry", "docker-registry"), ("skopeo", "skopeo")];
        if !tools_present(&tools) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: json\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:0\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        // The access log (combined format) goes to stdout, the JSON log to stderr.
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("access.log")).unwrap())
            .stderr(File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry starts");
        let log = dir.path().join("registry.log");
        let mut addr = None;
        let mut registry = Registry {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir,
        };
        let listening = wait_until(Duration::from_secs(20), || {
            addr = std::fs::read_to_string(&log).ok().and_then(|text| {
                let (_, rest) = text.split_once("\"listening on ")?;
                rest.split('"').next()?.parse().ok()
            });
            addr.is_some() || matches!(registry.child.try_wait(), Ok(Some(_)))
        });
        registry.addr = addr
            .filter(|_| listening)
            .unwrap_or_else(|| panic!("docker-registry did not start:\n{}", registry.log_text()));
        let answers = wait_until(Duration::from_secs(20), || {
            http(registry.addr, "GET", "/v2/", &[]).status == 200
        });
        assert!(
            answers,
            "registry /v2/ never answered:\n{}",
            registry.log_text()
        );
        Some(registry)
    }

    /// `host:port`, as image references and `registries.conf` name the registry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://host:port`, as `SHOAL_REGISTRY_UPSTREAM` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The registry's own (JSON) log, to show when a test fails.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes the image of the OCI layout `layout` (see [`build_image`]) as `name:tag`, moving
    /// the tag if it exists.
    pub fn push(&self, layout: &Path, name: &str, tag: &str) {
        let out = skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:image", layout.display()),
            &format!("docker://{}/{name}:{tag}", self.host()),
        ]);
        assert_success("skopeo push", &out);
    }

    /// The digest the registry gives for `name:reference` now (`HEAD` of the manifest), `None`
    /// if it has none.
    pub fn manifest_digest(&self, name: &str, reference: &str) -> Option<String> {
        let path = format!("/v2/{name}/manifests/{reference}");
        let reply = http(self.addr, "HEAD", &path, &[("Accept", MANIFEST_ACCEPT)]);
        let digest = reply.header("docker-content-digest").map(str::to_string);
        digest.filter(|_| reply.status == 200)
    }

    /// Every request the registry has logged so far. The registry logs a request once it has
    /// answered it; wait with [`wait_until`] for a count to be reached.
    pub fn accesses(&self) -> Vec<Access> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines().filter_map(parse_access).collect()
    }

    fn served(&self, suffix: &str) -> Served {
        let mut served = Served::default();
        for a in self.accesses().iter().filter(|a| a.path.ends_with(suffix)) {
            match a.method.as_str() {
                "GET" => {
                    served.gets += 1;
                    served.bytes += a.bytes;
                }
                "HEAD" => served.heads += 1,
                _ => {}
            }
        }
        served
    }

    /// What the registry served for the blob `digest`, under any repository name.
    pub fn blob_served(&self, digest: &str) -> Served {
        self.served(&format!("/blobs/{digest}"))
    }

    /// What the registry served for the manifest `reference` (a tag or a digest), under any
    /// repository name.
    pub fn manifest_served(&self, reference: &str) -> Served {
        self.served(&format!("/manifests/{reference}"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy in front of a registry that passes everything on but flips the last byte of every
/// response body (ranges too) for one blob; on its own threads, on 127.0.0.1 port 0, stopped
/// when dropped. Give its address to the mirror as the upstream.
pub struct TamperProxy {
    pub addr: SocketAddr,
    forwarded: Arc<AtomicU64>,
    tampered: Arc<AtomicU64>,
    target: Arc<Mutex<String>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TamperProxy {
    /// Proxies to `upstream`, tampering with the blob `digest`.
    pub fn start(upstream: SocketAddr, digest: &str) -> TamperProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("bound");
        let forwarded = Arc::new(AtomicU64::new(0));
        let tampered = Arc::new(AtomicU64::new(0));
        let target = Arc::new(Mutex::new(digest.to_string()));
        let proxy = Tamper {
            upstream,
            forwarded: forwarded.clone(),
            tampered: tampered.clone(),
            target: target.clone(),
        };
        runtime.spawn(serve_proxy(listener, Arc::new(proxy)));
        TamperProxy {
            addr,
            forwarded,
            tampered,
            target,
            runtime: Some(runtime),
        }
    }

    /// `http://host:port`, as `SHOAL_REGISTRY_UPSTREAM` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests it has passed on so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }

    /// How many response bodies have been tampered with so far.
    pub fn tampered(&self) -> u64 {
        self.tampered.load(Ordering::SeqCst)
    }

    /// Tampers with the blob `digest` from now on (an empty string: with none).
    pub fn retarget(&self, digest: &str) {
        *self.target.lock().unwrap() = digest.to_string();
    }
}

impl Drop for TamperProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

struct Tamper {
    upstream: SocketAddr,
    forwarded: Arc<AtomicU64>,
    tampered: Arc<AtomicU64>,
    /// A std Mutex: held only to read or replace the string, never across an await.
    target: Arc<Mutex<String>>,
}

async fn serve_proxy(listener: TcpListener, proxy: Arc<Tamper>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let proxy = proxy.clone();
                async move { Ok::<_, std::convert::Infallible>(forward(&proxy, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Passes `req` on to the registry and its answer back, whole, with the last body byte flipped
/// when it is the target blob.
async fn forward(proxy: &Tamper, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let target = proxy.target.lock().unwrap().clone();
    let tamper = !target.is_empty() && req.uri().path().ends_with(&format!("/blobs/{target}"));
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await else {
        return bad_gateway();
    };
    let req = Request::from_parts(parts, Full::new(body.to_bytes()));
    let Ok(stream) = TcpStream::connect(proxy.upstream).await else {
        return bad_gateway();
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return bad_gateway();
    };
    tokio::spawn(conn);
    let Ok(answer) = sender.send_request(req).await else {
        return bad_gateway();
    };
    proxy.forwarded.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = answer.into_parts();
    let Ok(body) = body.collect().await else {
        return bad_gateway();
    };
    let mut body = body.to_bytes().to_vec();
    if tamper {
        if let Some(last) = body.last_mut() {
            *last ^= 0xff;
            proxy.tampered.fetch_add(1, Ordering::SeqCst);
        }
    }
    Response::from_parts(parts, Full::new(Bytes::from(body)))
}

fn bad_gateway() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"registry unreachable")));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}
