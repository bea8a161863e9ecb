//! Pull-through from an HTTP origin with real processes and a real HTTP origin: peers that
//! want a file no peer shares split it between them through the tracker, so the origin sends
//! about one copy however many ask; the file then lives on in the swarm without the origin.
//! Origin faults end in clear errors and never leave a file under the wanted name.

mod common;
use common::origin::TestOrigin;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

const NAME: &str = "models/weights.bin";

/// A directory for the origin holding `NAME` (`len` bytes), and its path.
fn origin_dir(len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = make_file(&dir.path().join("models"), "weights.bin", len, 42);
    (dir, file)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `n` daemon peers `p0`.. under `dirs` that want `NAME` from `origin`, with `extra` settings.
fn pullers(
    tracker: &Proc,
    dirs: &Path,
    n: usize,
    origin: &TestOrigin,
    extra: &[(&str, &str)],
) -> Vec<Proc> {
    (0..n)
        .map(|i| puller(tracker, &dirs.join(format!("p{i}")), origin, extra))
        .collect()
}

/// A daemon peer in `dir` (named after it) that wants `NAME` from `origin`, with `extra`.
fn puller(tracker: &Proc, dir: &Path, origin: &TestOrigin, extra: &[(&str, &str)]) -> Proc {
    let url = origin.url();
    let mut env = vec![("SHOAL_ORIGIN", url.as_str()), ("SHOAL_WANT", NAME)];
    env.extend_from_slice(extra);
    let name = dir.file_name().unwrap().to_str().unwrap();
    daemon(tracker.addr, dir, name, &env)
}

/// Waits until every one of `peers` (started by [`pullers`], the first `skip` left out) holds
/// exactly `original` under `NAME`.
fn assert_all_land(original: &Path, dirs: &Path, peers: &[Proc], skip: usize) {
    for (i, p) in peers.iter().enumerate() {
        assert_lands(original, &dirs.join(format!("p{}", i + skip)).join(NAME), p);
    }
}

/// Nothing under the wanted name: neither the final file nor anything that would pass for it.
fn assert_nothing_landed(dir: &Path) {
    assert!(
        !dir.join(NAME).exists(),
        "a file landed under {NAME} after a failed pull"
    );
}

#[test]
fn eight_peers_wanting_a_new_file_get_one_copy_from_the_origin_then_the_swarm_keeps_it() {
    let len = 4 << 20;
    let (src, original) = origin_dir(len);
    let mut origin = TestOrigin::start(src.path());
    let tracker = tracker(&[]);
    let dirs = tempfile::tempdir().unwrap();
    let extra = [("SHOAL_ORIGIN_TIMEOUT", "5s")];
    // Range answers wait until more chunks are claimed than one peer may fetch at once
    // (SHOAL_ORIGIN_CONCURRENCY, 4): so at least two peers hold claims, whoever starts first.
    origin.origin.faults.hold.send_replace(true);
    let peers = pullers(&tracker, dirs.path(), 8, &origin, &extra);
    assert!(
        wait_until(Duration::from_secs(20), || tracker
            .metric("shoal_tracker_origin_claims")
            > 4.0),
        "the peers never claimed more than one peer's share"
    );
    origin.origin.faults.hold.send_replace(false);
    assert_all_land(&original, dirs.path(), &peers, 0);
    let sent = origin.bytes_sent();
    eprintln!(
        "origin sent {sent} bytes for a {len}-byte file to 8 peers: {:.3} copies",
        sent as f64 / len as f64
    );
    assert!(
        sent as f64 <= 1.2 * len as f64,
        "the origin sent {sent} bytes for a {len}-byte file"
    );
    let from_origin: f64 = peers
        .iter()
        .map(|p| p.metric("shoal_peer_origin_bytes_total"))
        .sum();
    assert_eq!(from_origin as u64, sent, "peers count what the origin sent");
    assert!(
        peers
            .iter()
            .filter(|p| p.metric("shoal_peer_origin_bytes_total") > 0.0)
            .count()
            > 1,
        "the file was split between several peers"
    );

    // The origin goes away; the swarm still has the file, as an ordinary version.
    origin.stop();
    let late_dir = dirs.path().join("late");
    let late = puller(&tracker, &late_dir, &origin, &extra);
    assert_lands(&original, &late_dir.join(NAME), &late);
    assert_eq!(late.metric("shoal_peer_origin_bytes_total"), 0.0);
    let out = std::process::Command::new(PEER)
        .args(["files", "--json", "--tracker", &tracker.addr.to_string()])
        .output()
        .unwrap();
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let (info, _) = shoal::chunking::hash_file(&original, NAME, Some(65536)).unwrap();
    let entry = listed.iter().find(|f| f["name"] == NAME).expect("listed");
    assert_eq!(entry["digest"], info.digest.to_hex(), "{entry}");
    assert_eq!(entry["size"], len as u64);
}

#[test]
fn with_three_trackers_pullers_meet_at_one_and_the_file_reaches_both_owners() {
    let len = 16 * 65536;
    let (src, original) = origin_dir(len);
    let origin = TestOrigin::start(src.path());
    let trackers = trackers(3, &[]);
    let list = tracker_list(&trackers);
    let dirs = tempfile::tempdir().unwrap();
    let extra = [
        ("SHOAL_TRACKER", list.as_str()),
        ("SHOAL_TRACKER_REPLICAS", "2"),
    ];
    let peers = pullers(&trackers[0], dirs.path(), 4, &origin, &extra);
    assert_all_land(&original, dirs.path(), &peers, 0);
    assert!(origin.bytes_sent() as f64 <= 1.2 * len as f64);
    for owner in owners_of(&trackers, NAME, 2) {
        let addr = trackers[owner].addr;
        assert!(
            wait_until(Duration::from_secs(20), || file_names(addr)
                .contains(&NAME.to_string())),
            "owner {addr} does not list {NAME}"
        );
    }
}

#[test]
fn pulling_peers_pass_chunks_to_each_other_before_the_origin_transfer_ends() {
    let len = 16 * 65536;
    let (src, original) = origin_dir(len);
    let origin = TestOrigin::start(src.path());
    // The last chunk is held at the origin: until it is released, no pull can complete, so any
    // chunk a peer gets from another meanwhile was passed on during the origin transfer.
    let faults = &origin.origin.faults;
    faults.stall_from.store(15 * 65536, Ordering::SeqCst);
    let tracker = tracker(&[]);
    let dirs = tempfile::tempdir().unwrap();
    let extra = [
        ("SHOAL_ORIGIN_CONCURRENCY", "1"),
        ("SHOAL_ORIGIN_TIMEOUT", "3s"),
    ];
    let peers = pullers(&tracker, dirs.path(), 3, &origin, &extra);
    let from_peers = || -> f64 {
        peers
            .iter()
            .map(|p| p.metric("shoal_peer_downloaded_bytes_total"))
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(20), || from_peers() > 0.0),
        "no chunk passed between pulling peers"
    );
    assert_eq!(
        tracker.metric("shoal_tracker_origin_files"),
        1.0,
        "still pulling"
    );
    faults.stall_from.store(0, Ordering::SeqCst);
    assert_all_land(&original, dirs.path(), &peers, 0);
    assert!(origin.bytes_sent() as f64 <= 1.2 * len as f64);
}

#[test]
fn the_chunks_of_a_peer_killed_mid_pull_are_fetched_again_by_the_others() {
    let len = 32 * 65536;
    let (src, original) = origin_dir(len);
    let origin = TestOrigin::start(src.path());
    origin.origin.faults.delay_ms.store(50, Ordering::SeqCst);
    let tracker = tracker(&[]);
    let dirs = tempfile::tempdir().unwrap();
    let extra = [("SHOAL_ORIGIN_CONCURRENCY", "1")];
    let mut peers = pullers(&tracker, dirs.path(), 3, &origin, &extra);
    let mut victim = peers.remove(0);
    assert!(wait_until(Duration::from_secs(20), || {
        victim.metric("shoal_peer_origin_bytes_total") > 0.0
    }));
    victim.kill9();
    assert_all_land(&original, dirs.path(), &peers, 1);
}

#[test]
fn a_one_shot_get_pulls_a_file_from_the_origin_and_counts_it() {
    let len = 300_000;
    let (src, original) = origin_dir(len);
    let origin = TestOrigin::start(src.path());
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let out = get_with(
        tracker.addr,
        NAME,
        dir.path(),
        &[("SHOAL_ORIGIN", &origin.url())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(same_bytes(&original, &dir.path().join(NAME)));
    assert_eq!(origin.bytes_sent(), len as u64, "exactly one copy");
}

#[test]
fn an_empty_file_at_the_origin_lands_empty() {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("models")).unwrap();
    std::fs::write(src.path().join(NAME), b"").unwrap();
    let origin = TestOrigin::start(src.path());
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let out = get_with(
        tracker.addr,
        NAME,
        dir.path(),
        &[("SHOAL_ORIGIN", &origin.url())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dir.path().join(NAME)).unwrap(), b"");
}

#[test]
fn an_api_reader_gets_a_file_only_the_origin_has() {
    let len = 300_000;
    let (src, original) = origin_dir(len);
    let origin = TestOrigin::start(src.path());
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let url = origin.url();
    let env = [("SHOAL_API_ADDR", "127.0.0.1:0"), ("SHOAL_ORIGIN", &url)];
    let node = daemon(tracker.addr, dir.path(), "agent", &env);
    let api = node.api.expect("the API address is logged");
    let missing = http(api, "GET", "/v1/files/models/absent.bin", &[]);
    assert_eq!(missing.status, 404, "not at the origin either");
    let got = http(api, "GET", &format!("/v1/files/{NAME}"), &[]);
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert!(got.error.is_none());
    assert_eq!(got.body, std::fs::read(&original).unwrap());
    assert_eq!(origin.bytes_sent(), len as u64);
    // Once pulled, the file is a version like any other: its digest is the ETag.
    let (info, _) = shoal::chunking::hash_file(&original, NAME, Some(65536)).unwrap();
    let etag = format!("\"{}\"", info.digest.to_hex());
    let head = http(api, "HEAD", &format!("/v1/files/{NAME}"), &[]);
    assert_eq!(head.header("etag"), Some(etag.as_str()));
}

#[test]
fn an_api_reader_gets_the_first_bytes_of_an_origin_file_while_the_pull_runs() {
    let len = 16 * 65536;
    let (src, path) = origin_dir(len);
    let original = std::fs::read(&path).unwrap();
    let origin = TestOrigin::start(src.path());
    // The last chunk is held at the origin: bytes that arrive before it is released were
    // streamed while the pull ran, before any digest was known.
    let faults = &origin.origin.faults;
    faults.stall_from.store(15 * 65536, Ordering::SeqCst);
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let url = origin.url();
    let env = [
        ("SHOAL_API_ADDR", "127.0.0.1:0"),
        ("SHOAL_ORIGIN", &url),
        ("SHOAL_ORIGIN_TIMEOUT", "3s"),
    ];
    let node = daemon(tracker.addr, dir.path(), "agent", &env);
    let api = node.api.expect("the API address is logged");
    let mut stream = HttpStream::open(api, "GET", &format!("/v1/files/{NAME}"), &[]);
    assert_eq!(stream.status, 200);
    let header = |name: &str| {
        let found = stream.headers.iter().find(|(n, _)| n == name);
        found.map(|(_, v)| v.clone())
    };
    assert_eq!(header("content-length"), Some(len.to_string()));
    assert_eq!(header("etag"), None, "no digest while pulling");
    let first = stream.read_exact(65536).expect("the first chunk");
    assert_eq!(first, original[..65536]);
    assert!(
        origin.bytes_sent() < len as u64,
        "the origin has not sent the last chunk yet"
    );
    // A second reader, of a range, joins the same pull.
    let range = http(
        api,
        "GET",
        &format!("/v1/files/{NAME}"),
        &[("Range", "bytes=300000-600000")],
    );
    assert_eq!(range.status, 206);
    assert!(
        range.body == original[300_000..=600_000],
        "exactly the range"
    );
    // The first reader goes on up to the chunk the origin holds, which it has not sent.
    let most = stream.read_exact(14 * 65536).expect("chunks 1 to 14");
    assert!(most == original[65536..15 * 65536]);
    assert!(origin.bytes_sent() < len as u64, "the last chunk is held");
    assert!(!dir.path().join(NAME).exists(), "still pulling");
    faults.stall_from.store(0, Ordering::SeqCst);
    let reply = stream.finish([first, most].concat());
    assert!(reply.error.is_none(), "{:?}", reply.error);
    assert!(
        reply.body == original,
        "the streamed bytes are the origin's"
    );
    assert_lands(&path, &dir.path().join(NAME), &node);
    assert_eq!(origin.bytes_sent(), len as u64, "one copy for both readers");
}

#[test]
fn a_pull_that_fails_cuts_the_api_response_short() {
    let len = 8 * 65536;
    let (src, _) = origin_dir(len);
    let origin = TestOrigin::start(src.path());
    // The file changes at the origin after three chunks, so the pull cannot complete.
    origin.origin.faults.change_after.store(3, Ordering::SeqCst);
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let url = origin.url();
    let env = [
        ("SHOAL_API_ADDR", "127.0.0.1:0"),
        ("SHOAL_ORIGIN", &url),
        ("SHOAL_ORIGIN_CONCURRENCY", "1"),
    ];
    let node = daemon(tracker.addr, dir.path(), "agent", &env);
    let api = node.api.expect("the API address is logged");
    let mut stream = HttpStream::open(api, "GET", &format!("/v1/files/{NAME}"), &[]);
    assert_eq!(stream.status, 200);
    let first = stream.read_exact(65536).expect("the first chunk");
    let reply = stream.finish(first);
    assert!(
        reply.body.len() < len,
        "a failed pull must not end like a complete body ({} bytes)",
        reply.body.len()
    );
    assert_nothing_landed(dir.path());
    let later = http(api, "GET", "/v1/status", &[]);
    assert_eq!(later.status, 200, "the API keeps serving");
}

#[test]
fn head_of_a_name_only_the_origin_has_gives_its_size_without_pulling_it() {
    let len = 300_000;
    let (src, _) = origin_dir(len);
    let origin = TestOrigin::start(src.path());
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let url = origin.url();
    let env = [("SHOAL_API_ADDR", "127.0.0.1:0"), ("SHOAL_ORIGIN", &url)];
    let node = daemon(tracker.addr, dir.path(), "agent", &env);
    let api = node.api.expect("the API address is logged");
    let head = http(api, "HEAD", &format!("/v1/files/{NAME}"), &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("300000"));
    assert_eq!(head.header("accept-ranges"), Some("bytes"));
    assert_eq!(head.header("etag"), None, "no digest before a pull");
    assert!(head.body.is_empty());
    assert_eq!(origin.bytes_sent(), 0, "nothing pulled");
    let status = http(api, "GET", "/v1/status", &[]).json();
    assert_eq!(status["transfers"], 0, "{status}");
    let absent = http(api, "HEAD", "/v1/files/models/absent.bin", &[]);
    assert_eq!(
        absent.status, 404,
        "neither the swarm nor the origin has it"
    );
}

#[test]
fn a_name_the_origin_does_not_have_fails_at_once_without_retries() {
    let (src, _) = origin_dir(100_000);
    let origin = TestOrigin::start(src.path());
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let out = get_with(
        tracker.addr,
        "models/absent.bin",
        dir.path(),
        &[("SHOAL_ORIGIN", &origin.url())],
    );
    assert_eq!(out.status.code(), Some(4), "the not-found exit code");
    assert!(
        stderr(&out).contains("not found at the origin"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        origin.origin.stats.requests.load(Ordering::SeqCst),
        1,
        "a 404 is not retried"
    );
    assert!(!dir.path().join("models/absent.bin").exists());
}

#[test]
fn a_daemon_says_once_that_a_wanted_name_is_nowhere_and_asks_the_origin_again_later() {
    let (src, _) = origin_dir(1000);
    let origin = TestOrigin::start(src.path());
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let url = origin.url();
    let env = [
        ("SHOAL_ORIGIN", url.as_str()),
        ("SHOAL_WANT", "models/absent.bin"),
    ];
    let node = daemon(tracker.addr, dir.path(), "d", &env);
    let requests = || origin.origin.stats.requests.load(Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(20), || requests() >= 2));
    let said = "neither the swarm nor the origin has it";
    let lines = node.log_text().lines().filter(|l| l.contains(said)).count();
    assert_eq!(lines, 1, "{}", node.log_text());
    assert!(!dir.path().join("models/absent.bin").exists());
}

#[test]
fn transient_server_errors_are_retried_and_the_pull_succeeds() {
    let (src, original) = origin_dir(200_000);
    let origin = TestOrigin::start(src.path());
    origin.origin.faults.fail_next.store(2, Ordering::SeqCst);
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let out = get_with(
        tracker.addr,
        NAME,
        dir.path(),
        &[("SHOAL_ORIGIN", &origin.url())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(same_bytes(&original, &dir.path().join(NAME)));
    assert!(origin.origin.stats.requests.load(Ordering::SeqCst) >= 3);
}

#[test]
fn a_persistently_failing_origin_ends_in_a_clear_error_and_no_file() {
    let (src, _) = origin_dir(200_000);
    let origin = TestOrigin::start(src.path());
    origin
        .origin
        .faults
        .fail_next
        .store(1_000, Ordering::SeqCst);
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let out = get_with(
        tracker.addr,
        NAME,
        dir.path(),
        &[("SHOAL_ORIGIN", &origin.url())],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("origin server error") && err.contains("gave up after 4 tries"),
        "{err}"
    );
    assert_eq!(
        origin.origin.stats.requests.load(Ordering::SeqCst),
        4,
        "bounded retries"
    );
    assert_nothing_landed(dir.path());
}

#[test]
fn a_file_that_changes_at_the_origin_mid_transfer_fails_and_leaves_no_file() {
    let (src, _) = origin_dir(8 * 65536);
    let origin = TestOrigin::start(src.path());
    origin.origin.faults.change_after.store(3, Ordering::SeqCst);
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SHOAL_ORIGIN", origin.url()),
        ("SHOAL_ORIGIN_CONCURRENCY", "1".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = get_with(tracker.addr, NAME, dir.path(), &env);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("changed at the origin"),
        "{}",
        stderr(&out)
    );
    assert_nothing_landed(dir.path());
}

#[test]
fn a_stalled_origin_times_out_into_a_clear_error() {
    let (src, _) = origin_dir(100_000);
    let origin = TestOrigin::start(src.path());
    origin.origin.faults.stall.store(true, Ordering::SeqCst);
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SHOAL_ORIGIN", origin.url()),
        ("SHOAL_ORIGIN_TIMEOUT", "300ms".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = get_with(tracker.addr, NAME, dir.path(), &env);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no complete answer within 300ms"),
        "{}",
        stderr(&out)
    );
    assert_nothing_landed(dir.path());
}

#[test]
fn origin_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value, expected) in [
        (
            "SHOAL_ORIGIN",
            "ftp://files.example",
            "not an http:// or https:// URL",
        ),
        ("SHOAL_ORIGIN", "files.example", "SHOAL_ORIGIN"),
        (
            "SHOAL_ORIGIN_CONCURRENCY",
            "0",
            "SHOAL_ORIGIN_CONCURRENCY must be at least 1",
        ),
    ] {
        let out = std::process::Command::new(PEER)
            .arg("run")
            .env("SHOAL_DATA_DIR", dir.path())
            .env(var, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} accepted");
        assert!(
            stderr(&out).contains(expected),
            "{var}={value}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn origin_claims_are_checked_like_every_tracker_request() {
    let tracker = tracker(&[]);
    let mut raw = Raw::connect(tracker.addr);
    let reg = raw.ask(r#"{"v":1,"msg":1,"name":"p","addr":"0.0.0.0:7401"}"#);
    let (id, token) = (
        reg["peer_id"].as_u64().unwrap(),
        reg["token"].as_str().unwrap(),
    );
    // Another token of this tracker run: the last digit changed.
    let last = if token.ends_with('0') { "1" } else { "0" };
    let forged = format!("{}{last}", &token[..token.len() - 1]);
    let claim = |fields: &str| {
        format!(
            r#"{{"v":1,"msg":9,"peer_id":{id},"token":"{token}","file":"a.bin","size":10000,"validator":"v","chunk_size":4096{fields}}}"#
        )
    };
    let cases = [
        (claim(r#","want":2"#), None),
        (
            claim(r#","hashes":[{"index":3,"hash":"00"}]"#),
            Some("bad_request"),
        ),
        (
            claim(&format!(
                r#","hashes":[{{"index":3,"hash":"{}"}}]"#,
                "00".repeat(32)
            )),
            Some("out_of_range"),
        ),
        (
            claim(r#","want":1"#).replace("4096", "100"),
            Some("bad_request"),
        ),
        (claim("").replace(token, &forged), Some("forbidden")),
        (claim("").replace("a.bin", "../a.bin"), Some("invalid_name")),
        (
            claim(r#","abandon":true"#).replace("10000", "20000"),
            Some("unknown_file"),
        ),
    ];
    for (line, refused) in cases {
        let reply = raw.ask(&line);
        match refused {
            None => assert_eq!(reply["granted"], serde_json::json!([0, 1]), "{reply}"),
            Some(code) => assert_eq!(reply["error"], code, "{line}: {reply}"),
        }
    }
    assert_eq!(tracker.metric("shoal_tracker_origin_files"), 1.0);
    assert_eq!(tracker.metric("shoal_tracker_origin_claims"), 2.0);
}
