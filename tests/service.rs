//! Service mode with real processes configured by environment only: leases and tracker
//! restarts, graceful leave, resume after SIGKILL, readiness, secrets and configuration errors.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: usize = 1 << 20;

#[test]
fn tracker_restarted_empty_relists_every_file_and_downloads_go_on() {
    let mut tracker = tracker(&[]);
    let addr = tracker.addr;
    let dir = tempfile::tempdir().unwrap();
    let big = make_file(&dir.path().join("s1"), "one.bin", 2 * MIB, 20);
    make_file(&dir.path().join("s2"), "two.bin", 300_000, 21);
    let _s1 = daemon(
        addr,
        &dir.path().join("s1"),
        "s1",
        &[("SHOAL_UPLOAD_LIMIT", "1048576")],
    );
    let _s2 = daemon(addr, &dir.path().join("s2"), "s2", &[]);
    assert!(wait_until(Duration::from_secs(10), || file_names(addr)
        .len()
        == 2));
    let d = daemon(
        addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_WANT", "one.bin")],
    );
    assert!(wait_until(Duration::from_secs(20), || d
        .metric("shoal_peer_downloaded_chunks_total")
        >= 4.0));

    tracker.kill9();
    // The download goes on with the holders it already knows.
    assert!(
        wait_until(Duration::from_secs(30), || same_bytes(
            &big,
            &dir.path().join("d/one.bin")
        )),
        "{}",
        d.log_text()
    );
    let restarted = tracker_at(addr, &[]);
    assert!(wait_until(Duration::from_secs(10), || file_names(addr)
        == ["one.bin", "two.bin"]));
    assert!(
        wait_until(Duration::from_secs(10), || holder_count(addr, "one.bin")
            == 2),
        "the downloader re-registers as a holder"
    );
    assert_eq!(restarted.metric("shoal_tracker_registrations_total"), 3.0);
    assert_eq!(restarted.metric("shoal_tracker_peers"), 3.0);
    // One line each way for the outage, not one per chunk the downloader reported meanwhile.
    assert!(wait_until(Duration::from_secs(5), || d.log_contains("tracker is back")));
    let log = d.log_text();
    let warnings: Vec<_> = log
        .lines()
        .filter(|l| l.contains(r#""level":"WARN""#))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("tracker unreachable"), "{log}");
    assert_eq!(log.matches("tracker is back").count(), 1, "{log}");
}

#[test]
fn sigterm_leaves_at_once_and_exits_zero() {
    // A long interval: only the leave message can explain a prompt removal.
    let tracker = tracker(&[("SHOAL_ANNOUNCE_INTERVAL", "60s")]);
    let dir = tempfile::tempdir().unwrap();
    make_file(&dir.path().join("s"), "a.bin", 100_000, 22);
    let mut peer = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "a.bin"
    ) == 1));

    peer.signal("TERM");
    let status = peer
        .wait_exit(Duration::from_secs(5))
        .expect("exits within a couple of seconds");

    assert!(status.success(), "exit status {status}");
    assert_eq!(
        holder_count(tracker.addr, "a.bin"),
        0,
        "the tracker must forget the peer at once"
    );
    assert_eq!(tracker.metric("shoal_tracker_peers"), 0.0);
    assert_eq!(
        tracker.metric(r#"shoal_tracker_requests_total{msg="leave",outcome="ok"}"#),
        1.0
    );
}

#[test]
fn silent_peer_is_expired_by_lease() {
    let tracker = tracker(&[("SHOAL_ANNOUNCE_INTERVAL", "300ms")]);
    let dir = tempfile::tempdir().unwrap();
    make_file(&dir.path().join("s"), "a.bin", 100_000, 23);
    let mut peer = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "a.bin"
    ) == 1));
    peer.kill9();
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "a.bin"
    ) == 0));
    assert_eq!(tracker.metric("shoal_tracker_leases_expired_total"), 1.0);
}

#[test]
fn downloader_killed_with_sigkill_resumes_instead_of_starting_over() {
    let (tracker, _s, dir, original) =
        seeded("big.bin", 4 * MIB, 24, &[("SHOAL_UPLOAD_LIMIT", "1048576")]);
    let data = dir.path().join("d");
    let mut first = daemon(tracker.addr, &data, "d", &[("SHOAL_WANT", "big.bin")]);
    assert!(wait_until(Duration::from_secs(20), || first
        .metric("shoal_peer_downloaded_chunks_total")
        >= 16.0));

    first.kill9();
    assert!(
        !data.join("big.bin").exists(),
        "an incomplete file must never carry the final name"
    );
    assert!(data.join(".big.bin.shoal-part").exists());
    let second = daemon(tracker.addr, &data, "d", &[("SHOAL_WANT", "big.bin")]);

    assert!(
        wait_until(Duration::from_secs(60), || same_bytes(
            &original,
            &data.join("big.bin")
        )),
        "{}",
        second.log_text()
    );
    let fetched = second.metric("shoal_peer_downloaded_chunks_total");
    assert!(
        fetched <= 48.0,
        "the restart fetched {fetched} of 64 chunks: it started over"
    );
    assert!(second.log_contains("resuming partial download"));
    // The hidden files go just after the rename.
    let names = || -> Vec<_> {
        std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(5), || names() == ["big.bin"]),
        "partial files left behind: {:?}",
        names()
    );
}

#[test]
fn partial_downloads_serve_their_verified_chunks() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    make_file(&dir.path().join("s"), "big.bin", 4 * MIB, 25);
    let _s = daemon(
        tracker.addr,
        &dir.path().join("s"),
        "s",
        &[("SHOAL_UPLOAD_LIMIT", "524288")],
    );
    let d = daemon(
        tracker.addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_WANT", "big.bin")],
    );
    assert!(wait_until(Duration::from_secs(20), || d
        .metric("shoal_peer_downloaded_chunks_total")
        >= 2.0));
    let loc = locations(tracker.addr, "big.bin");
    let held = d.metric("shoal_peer_downloaded_chunks_total");
    assert!(held < 64.0, "the test needs d to be mid-download");
    let mut c = Raw::connect(d.addr);
    // Find a chunk d has, by asking for each in turn: a partial peer answers not_found or bytes.
    let served = (0..64).find(|i| {
        c.ask(&format!(
            r#"{{"v":1,"msg":5,"file":"big.bin","index":{i}}}"#
        ))["ok"]
            == true
    });
    served.expect("a partial peer serves the chunks it verified");
    assert_eq!(c.recv_bytes(65536).len(), 65536);
    assert!(
        loc["total_peers"].as_u64().unwrap() >= 2,
        "the partial holder is listed: {loc}"
    );
}

#[test]
fn readiness_follows_registration_and_health_is_always_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let peer = daemon(port, dir.path(), "early", &[]);
    let metrics = peer.metrics.unwrap();
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    assert_eq!(
        http_get(metrics, "/readyz").0,
        503,
        "not ready before any tracker answers"
    );
    let _tracker = tracker_at(port, &[]);
    assert!(wait_until(Duration::from_secs(10), || http_get(
        metrics, "/readyz"
    )
    .0 == 200));
    let status = Command::new(PEER)
        .arg("health")
        .env("SHOAL_METRICS_ADDR", metrics.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let status = Command::new(PEER)
        .arg("health")
        .env("SHOAL_METRICS_ADDR", closed.to_string())
        .status()
        .unwrap();
    assert!(!status.success());
}

#[test]
fn cluster_secret_keeps_strangers_out() {
    let secret = [("SHOAL_SECRET", "s3cret")];
    let tracker = tracker(&secret);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), "a.bin", 200_000, 26);
    let seeder = daemon(tracker.addr, &dir.path().join("s"), "s", &secret);
    assert!(wait_until(Duration::from_secs(10), || seeder
        .log_contains("registered with tracker")));
    assert!(
        !seeder.log_text().contains("s3cret"),
        "the secret must be masked in logs"
    );

    let stranger =
        Raw::connect(tracker.addr).ask(r#"{"v":1,"msg":1,"name":"x","addr":"127.0.0.1:9"}"#);
    assert_eq!(stranger["error"], "unauthorized");
    let chunk = Raw::connect(seeder.addr).ask(r#"{"v":1,"msg":5,"file":"a.bin","index":0}"#);
    assert_eq!(
        chunk["error"], "unauthorized",
        "no chunks without the secret"
    );
    let d = daemon(
        tracker.addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_SECRET", "s3cret"), ("SHOAL_WANT", "a.bin")],
    );
    assert!(
        wait_until(Duration::from_secs(20), || same_bytes(
            &original,
            &dir.path().join("d/a.bin")
        )),
        "{}",
        d.log_text()
    );
}

#[test]
fn invalid_settings_stop_the_program_naming_the_variable() {
    let out = Command::new(TRACKER)
        .env("SHOAL_ANNOUNCE_INTERVAL", "soon")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHOAL_ANNOUNCE_INTERVAL"));
    let out = Command::new(PEER)
        .arg("run")
        .env("SHOAL_CHUNK_SIZE", "12")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHOAL_CHUNK_SIZE"));
    let out = Command::new(PEER)
        .arg("run")
        .env("SHOAL_LISTEN", "everywhere")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHOAL_LISTEN"));
}

#[test]
fn config_file_sits_below_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tracker.toml");
    std::fs::write(&file, "announce_interval = \"7s\"\nmax_holders = 3\n").unwrap();
    let t = tracker(&[
        ("SHOAL_CONFIG", file.to_str().unwrap()),
        ("SHOAL_MAX_HOLDERS", "9"),
    ]);
    let reply = Raw::connect(t.addr).ask(r#"{"v":1,"msg":1,"name":"p","addr":"127.0.0.1:9"}"#);
    assert_eq!(
        reply["announce_interval_ms"], 1000,
        "the harness's SHOAL_ANNOUNCE_INTERVAL=1s beats the file"
    );
    let start = t
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "starting shoal-tracker")
        .expect("a start line");
    assert_eq!(start["config"]["max_holders"], 9, "{start}");
}

#[test]
fn json_logs_carry_download_spans_with_the_file() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), "a.bin", 200_000, 27);
    let _s = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    let d = daemon(
        tracker.addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_WANT", "a.bin")],
    );
    assert!(wait_until(Duration::from_secs(20), || same_bytes(
        &original,
        &dir.path().join("d/a.bin")
    )));
    assert!(wait_until(Duration::from_secs(5), || d
        .log_contains("download complete")));
    let log = d.log_text();
    let started = log
        .lines()
        .find(|l| l.contains("download started"))
        .expect("a start line");
    let v: serde_json::Value = serde_json::from_str(started).unwrap();
    assert_eq!(v["span"]["file"], "a.bin", "{started}");
    assert!(log
        .lines()
        .any(|l| l.contains("download complete") && l.contains("\"sources\"")));
}
