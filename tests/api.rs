//! The node agent's HTTP API with real processes: a file not held yet streams out as its chunks
//! arrive, ranges give exactly their bytes, versions can be pinned, names with directories
//! work, concurrent readers share one download, and a download that fails cuts the response
//! short instead of ending it as if complete.

mod common;
use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

const MIB: usize = 1 << 20;

/// A daemon peer with the API on an ephemeral port, wanting nothing by itself.
fn agent(tracker: SocketAddr, dir: &Path, env: &[(&str, &str)]) -> Proc {
    let mut all = vec![("SHOAL_API_ADDR", "127.0.0.1:0")];
    all.extend_from_slice(env);
    let p = daemon(tracker, dir, "agent", &all);
    assert!(p.api.is_some(), "the start-up line gives the API address");
    p
}

/// A tracker, a seeder of one file uploading at most `limit` per second, and an agent.
struct Capped {
    tracker: Proc,
    seeder: Proc,
    dir: tempfile::TempDir,
    original: std::path::PathBuf,
    node: Proc,
    api: SocketAddr,
}

fn capped(name: &str, size: usize, seed: u64, limit: &str) -> Capped {
    let (tracker, seeder, dir, original) =
        seeded(name, size, seed, &[("SHOAL_UPLOAD_LIMIT", limit)]);
    let node = agent(tracker.addr, &dir.path().join("a"), &[]);
    let api = node.api.unwrap();
    Capped {
        tracker,
        seeder,
        dir,
        original,
        node,
        api,
    }
}

/// This node's entry for `name` in `GET /v1/files`.
fn node_state(api: SocketAddr, name: &str) -> Value {
    let reply = http(api, "GET", "/v1/files", &[]);
    assert_eq!(reply.status, 200);
    let files = reply.json()["files"].as_array().unwrap().clone();
    files
        .into_iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in /v1/files"))
}

#[test]
fn a_file_streams_out_while_it_is_still_arriving() {
    let size = 16 * MIB;
    let swarm = capped("big.bin", size, 71, "4MiB");
    let (tracker, dir, original, node, api) = (
        &swarm.tracker,
        &swarm.dir,
        &swarm.original,
        &swarm.node,
        swarm.api,
    );
    assert_eq!(node_state(api, "big.bin")["state"], "absent");

    let mut stream = HttpStream::open(api, "GET", "/v1/files/big.bin", &[]);
    assert_eq!(stream.status, 200);
    let digest = listed_digest(tracker.addr, "big.bin");
    let header = |n: &str| {
        stream
            .headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("etag"), Some(format!("\"{digest}\"")));
    assert_eq!(header("content-length"), Some(size.to_string()));
    assert_eq!(header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(
        header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    let first = stream.read_exact(65536).expect("the first chunk");
    let here = node_state(api, "big.bin");
    assert_eq!(
        here["state"], "partial",
        "the first bytes came early: {here}"
    );
    assert!(here["percent"].as_f64().unwrap() < 100.0, "{here}");
    let status = http(api, "GET", "/v1/status", &[]).json();
    let file = &status["files"][0];
    assert_eq!(file["name"], "big.bin", "{status}");
    assert_eq!(file["downloading"], true, "{status}");
    assert_eq!(file["readers"], 1, "{status}");
    let seeder = swarm.seeder.addr.to_string();
    assert_eq!(file["sources"], serde_json::json!([seeder]), "{status}");
    assert_eq!(status["api_streams"], 1, "{status}");
    let reply = stream.finish(first);
    assert!(reply.error.is_none(), "{:?}", reply.error);
    assert!(
        reply.body == std::fs::read(original).unwrap(),
        "the body is the file"
    );
    assert!(wait_until(Duration::from_secs(10), || node_state(
        api, "big.bin"
    )["state"]
        == "complete"));
    assert!(same_bytes(original, &dir.path().join("a/big.bin")));
    assert_eq!(node.metric("shoal_api_bytes_sent_total"), size as f64);
    assert_eq!(
        node.metric(r#"shoal_api_requests_total{route="file",status="200"}"#),
        1.0
    );
}

#[test]
fn ranges_heads_and_errors_answer_exactly() {
    let size = 1_000_003;
    let (tracker, _seeder, dir, original) = seeded("r.bin", size, 72, &[]);
    let node = agent(tracker.addr, &dir.path().join("a"), &[]);
    let api = node.api.unwrap();
    let bytes = std::fs::read(original).unwrap();
    // Middle first, on a node that holds nothing yet: those chunks are fetched first.
    let cases = [
        ("bytes=65000-140000", 65000, 140000),
        ("bytes=0-99", 0, 99),
        ("bytes=999000-", 999000, size - 1),
        ("bytes=-1000", size - 1000, size - 1),
        ("bytes=10-5000000", 10, size - 1),
    ];
    for (range, a, b) in cases {
        let reply = http(api, "GET", "/v1/files/r.bin", &[("Range", range)]);
        assert_eq!(reply.status, 206, "{range}");
        assert_eq!(
            reply.header("content-range"),
            Some(format!("bytes {a}-{b}/{size}").as_str()),
            "{range}"
        );
        assert_eq!(
            reply.header("content-length"),
            Some((b - a + 1).to_string().as_str())
        );
        assert!(reply.body == bytes[a..=b], "{range}: other bytes");
    }
    let past = http(
        api,
        "GET",
        "/v1/files/r.bin",
        &[("Range", "bytes=1000003-")],
    );
    assert_eq!(past.status, 416);
    assert_eq!(past.header("content-range"), Some("bytes */1000003"));
    assert!(past.json()["error"].is_string());

    let head = http(api, "HEAD", "/v1/files/r.bin", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1000003"));
    let etag = head.header("etag").expect("an etag").to_string();
    assert!(head.body.is_empty(), "HEAD has no body");
    let unchanged = http(api, "GET", "/v1/files/r.bin", &[("If-None-Match", &etag)]);
    assert_eq!((unchanged.status, unchanged.body.len()), (304, 0));

    let missing = http(api, "GET", "/v1/files/nope.bin", &[]);
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"]
        .as_str()
        .unwrap()
        .contains("nope.bin"));
    for bad in [
        "/v1/files/..%2Fetc",
        "/v1/files/a//b",
        "/v1/files/",
        "/v1/files/%FF",
    ] {
        let reply = http(api, "GET", bad, &[]);
        assert_eq!(reply.status, 400, "{bad}");
        assert!(reply.json()["error"].is_string(), "{bad}");
    }
    assert_eq!(
        http(api, "GET", "/v1/files/r.bin?digest=xyz", &[]).status,
        400
    );
    let post = http(api, "POST", "/v1/files/r.bin", &[("Content-Length", "0")]);
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    let elsewhere = http(api, "GET", "/v3/anything", &[]);
    assert_eq!(elsewhere.status, 404);
    assert!(elsewhere.json()["error"].is_string());
    assert_eq!(
        node.metric(r#"shoal_api_requests_total{route="file",status="206"}"#),
        5.0
    );
    assert_eq!(
        node.metric(r#"shoal_api_requests_total{route="other",status="404"}"#),
        1.0
    );
    let status = http(api, "GET", "/v1/status", &[]).json();
    assert_eq!(status["tracker"], tracker.addr.to_string());
    assert!(status["peer_id"].is_u64(), "{status}");
}

#[test]
fn names_with_directories_and_pinned_versions_are_served() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let nested = make_file(&dir.path().join("s/models/v"), "weights.bin", 300_000, 73);
    let old = make_file(&dir.path().join("o"), "model.bin", 200_000, 74);
    let new = make_file(&dir.path().join("n"), "model.bin", 200_000, 75);
    let stamp = |p: &Path, secs: u64| {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    };
    stamp(&old, 1_000_000);
    stamp(&new, 2_000_000);
    let _s = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    let _o = daemon(tracker.addr, &dir.path().join("o"), "o", &[]);
    let _n = daemon(tracker.addr, &dir.path().join("n"), "n", &[]);
    assert!(wait_until(Duration::from_secs(10), || {
        let names = file_names(tracker.addr);
        names.contains(&"models/v/weights.bin".to_string()) && names.contains(&"model.bin".into())
    }));
    let node = agent(tracker.addr, &dir.path().join("a"), &[]);
    let api = node.api.unwrap();

    let head = http(api, "HEAD", "/v1/files/models/v/weights.bin", &[]);
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("300000"))
    );
    assert_eq!(
        node_state(api, "models/v/weights.bin")["state"],
        "absent",
        "HEAD only looks"
    );
    assert_eq!(http(api, "GET", "/v1/status", &[]).json()["transfers"], 0);
    let reply = http(api, "GET", "/v1/files/models/v/weights.bin", &[]);
    assert_eq!(reply.status, 200);
    assert!(reply.body == std::fs::read(&nested).unwrap());
    let encoded = http(api, "GET", "/v1/files/models%2Fv%2Fweights.bin", &[]);
    assert!(encoded.body == reply.body, "a percent-encoded '/' is a '/'");

    let digest = |p: &Path| offer_for(p, 65536)["digest"].as_str().unwrap().to_string();
    let pinned = http(
        api,
        "GET",
        &format!("/v1/files/model.bin?digest={}", digest(&old)),
        &[],
    );
    assert_eq!(pinned.status, 200);
    assert_eq!(
        pinned.header("etag"),
        Some(format!("\"{}\"", digest(&old)).as_str())
    );
    assert!(
        pinned.body == std::fs::read(&old).unwrap(),
        "the old version"
    );
    let newest = http(api, "GET", "/v1/files/model.bin", &[]);
    assert!(
        newest.body == std::fs::read(&new).unwrap(),
        "the newest version: {} {:?} {} {}",
        newest.status,
        newest.error,
        newest.body.len(),
        node.log_text()
    );
    let unknown = http(
        api,
        "GET",
        &format!("/v1/files/model.bin?digest={}", "ab".repeat(32)),
        &[],
    );
    assert_eq!(unknown.status, 404);
}

#[test]
fn concurrent_readers_share_one_download() {
    let size = 8 * MIB;
    let swarm = capped("shared.bin", size, 76, "4MiB");
    let (seeder, original, api) = (&swarm.seeder, &swarm.original, swarm.api);
    let readers: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || http(api, "GET", "/v1/files/shared.bin", &[])))
        .collect();
    let mut seen = Value::Null;
    let sharing = wait_until(Duration::from_secs(20), || {
        seen = http(api, "GET", "/v1/status", &[]).json();
        let file = &seen["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "shared.bin")
            .cloned()
            .unwrap_or_default();
        seen["transfers"] == 1 && file["readers"] == 2 && file["downloading"] == true
    });
    assert!(sharing, "two readers of one transfer: {seen}");
    let bytes = std::fs::read(original).unwrap();
    for r in readers {
        let reply = r.join().unwrap();
        assert_eq!(reply.status, 200);
        assert!(reply.body == bytes, "each reader gets the whole file");
    }
    let uploaded = seeder.metric("shoal_peer_uploaded_bytes_total");
    assert!(
        uploaded <= size as f64 * 1.1,
        "one copy left the seeder, not two: {uploaded}"
    );
}

#[test]
fn a_download_that_fails_mid_stream_cuts_the_response_short() {
    let size = 16 * MIB;
    let mut swarm = capped("gone.bin", size, 77, "2MiB");
    let api = swarm.api;
    let mut stream = HttpStream::open(api, "GET", "/v1/files/gone.bin", &[]);
    assert_eq!(stream.status, 200);
    let first = stream.read_exact(MIB).expect("the first MiB");
    swarm.seeder.kill9();
    let reply = stream.finish(first);
    assert!(
        reply.body.len() < size,
        "a failed download must not end like a complete body ({} bytes)",
        reply.body.len()
    );
    assert!(
        !swarm.dir.path().join("a/gone.bin").exists(),
        "nothing incomplete under the final name"
    );
    let later = http(api, "GET", "/v1/status", &[]);
    assert_eq!(later.status, 200, "the API keeps serving");
}
