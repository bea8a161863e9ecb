//! Faults during transfers, with real processes: holders that die, stall, lie, or cannot be
//! reached. The download must still finish byte-identical from the honest holders.

mod common;
use common::*;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// A daemon in `dir/d` that wants `data.bin`.
fn fetching_data_bin(tracker: std::net::SocketAddr, dir: &std::path::Path) -> Proc {
    daemon(tracker, &dir.join("d"), "d", &[("SHOAL_WANT", "data.bin")])
}

#[test]
fn holder_killed_mid_transfer_is_replaced() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("a"), "big.bin", 4 * MIB, 10);
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    std::fs::copy(&original, dir.path().join("b/big.bin")).unwrap();
    let slow = [("SHOAL_UPLOAD_LIMIT", "1048576")];
    let mut a = daemon(tracker.addr, &dir.path().join("a"), "a", &slow);
    let _b = daemon(tracker.addr, &dir.path().join("b"), "b", &slow);
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "big.bin"
    ) == 2));

    let d = daemon(
        tracker.addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_WANT", "big.bin")],
    );
    assert!(wait_until(Duration::from_secs(20), || d
        .metric("shoal_peer_downloaded_chunks_total")
        >= 8.0));
    a.kill9();

    assert!(
        wait_until(Duration::from_secs(60), || same_bytes(
            &original,
            &dir.path().join("d/big.bin")
        )),
        "{}",
        d.log_text()
    );
    assert!(d.metric("shoal_peer_holders_dropped_total") >= 1.0);
    assert_eq!(d.metric("shoal_peer_downloaded_chunks_total"), 64.0);
}

#[test]
fn lying_holder_is_detected_by_hash_and_dropped() {
    let (tracker, _s, dir, original) = seeded(
        "data.bin",
        2 * MIB,
        11,
        &[("SHOAL_UPLOAD_LIMIT", "1048576")],
    );
    let loc = locations(tracker.addr, "data.bin");
    let liar = fake_holder(Hostile::Lies, &loc);
    register_fake_holder(tracker.addr, &liar.addr.to_string(), &loc);

    let d = fetching_data_bin(tracker.addr, dir.path());

    assert_lands(&original, &dir.path().join("d/data.bin"), &d);
    assert!(
        d.metric("shoal_peer_chunk_verify_failures_total") >= 1.0,
        "the lie was never seen"
    );
    assert_eq!(
        d.metric("shoal_peer_downloaded_chunks_total"),
        32.0,
        "a bad chunk was counted as downloaded"
    );
    assert_eq!(
        *liar.connections.lock().unwrap(),
        1,
        "a banned liar must not be asked again"
    );
    assert!(d.log_contains("does not match its hash"));
    assert_eq!(
        d.metric(r#"shoal_peer_holders_banned_total{reason="corrupt_chunk"}"#),
        1.0,
        "the ban and its reason are visible"
    );
}

#[test]
fn stalled_holder_is_dropped_after_the_chunk_timeout() {
    let (tracker, _s, dir, original) =
        seeded("data.bin", MIB, 12, &[("SHOAL_UPLOAD_LIMIT", "524288")]);
    let loc = locations(tracker.addr, "data.bin");
    let staller = fake_holder(Hostile::Stalls, &loc);
    register_fake_holder(tracker.addr, &staller.addr.to_string(), &loc);

    let d = daemon(
        tracker.addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_WANT", "data.bin"), ("SHOAL_CHUNK_TIMEOUT", "1s")],
    );

    assert_lands(&original, &dir.path().join("d/data.bin"), &d);
    assert!(d.log_contains("stalled"), "{}", d.log_text());
    assert!(*staller.connections.lock().unwrap() >= 1);
}

#[test]
fn unreachable_advertised_address_is_skipped() {
    let (tracker, _s, dir, original) = seeded("data.bin", MIB, 13, &[]);
    let loc = locations(tracker.addr, "data.bin");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    register_fake_holder(tracker.addr, &closed.to_string(), &loc);

    let d = fetching_data_bin(tracker.addr, dir.path());

    assert!(
        wait_until(Duration::from_secs(30), || same_bytes(
            &original,
            &dir.path().join("d/data.bin")
        )),
        "{}",
        d.log_text()
    );
    assert!(d.log_contains("cannot connect"), "{}", d.log_text());
}

#[test]
fn disk_full_on_the_downloader_fails_clearly_and_it_keeps_serving() {
    if !std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(
            std::env::var("CI").is_err(),
            "CI must be able to run this test (needs unshare -m and mount)"
        );
        eprintln!("skipping: this machine does not allow a private mount namespace");
        return;
    }
    let (tracker, _s, dir, original) = seeded("big.bin", MIB, 70, &[]);
    let data = dir.path().join("d");
    std::fs::create_dir_all(&data).unwrap();

    // The downloader's data dir is a 256 KiB tmpfs in its own mount namespace: it fills mid-file.
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "-m",
        "sh",
        "-c",
        r#"mount -t tmpfs -o size=256k shoal-test "$0" && exec "$1" run"#,
    ])
    .arg(&data)
    .arg(PEER);
    daemon_env(
        &mut cmd,
        tracker.addr,
        &data,
        "d",
        &[("SHOAL_WANT", "big.bin")],
    );
    let d = Proc::spawn(cmd, "peer listening");

    assert!(
        wait_until(Duration::from_secs(30), || d
            .log_contains("No space left on device")),
        "{}",
        d.log_text()
    );
    assert!(d.metric("shoal_peer_downloads_failed_total") >= 1.0);
    let seen_by_d = std::path::PathBuf::from(format!("/proc/{}/root", d.pid()))
        .join(data.strip_prefix("/").unwrap());
    assert!(
        seen_by_d.join(".big.bin.shoal-part").exists(),
        "the partial download stays for a later resume"
    );
    assert!(
        !seen_by_d.join("big.bin").exists(),
        "no incomplete file under the final name"
    );
    // What it verified before the disk filled, it still serves, byte for byte.
    let mut c = Raw::connect(d.addr);
    let held = (0..16).find(|i| {
        c.ask(&format!(
            r#"{{"v":1,"msg":5,"file":"big.bin","index":{i}}}"#
        ))["ok"]
            == true
    });
    let i = held.expect("some chunks were written before the disk filled");
    let body = c.recv_bytes(65536);
    assert_eq!(
        body,
        std::fs::read(&original).unwrap()[i * 65536..(i + 1) * 65536]
    );
}

#[test]
fn unwritable_download_target_fails_clearly_and_the_peer_keeps_serving() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    make_file(&dir.path().join("s"), "big.bin", MIB, 71);
    let _s = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    let data = dir.path().join("d");
    make_file(&data, "mine.bin", 100_000, 72);
    // Something that cannot be replaced by a file sits where the partial download must go.
    std::fs::create_dir_all(data.join(".big.bin.shoal-part")).unwrap();
    let d = daemon(tracker.addr, &data, "d", &[("SHOAL_WANT", "big.bin")]);

    assert!(
        wait_until(Duration::from_secs(20), || d.log_contains("cannot create")),
        "{}",
        d.log_text()
    );
    assert!(d.metric("shoal_peer_downloads_failed_total") >= 1.0);
    assert!(!data.join("big.bin").exists());
    let mut c = Raw::connect(d.addr);
    assert_eq!(
        c.ask(r#"{"v":1,"msg":5,"file":"mine.bin","index":0}"#)["ok"],
        true,
        "it keeps serving its own files"
    );
}

#[test]
fn a_lying_holder_stays_banned_across_download_attempts() {
    // A long lease keeps the liar listed for the whole test without announcing.
    let tracker = tracker(&[("SHOAL_ANNOUNCE_INTERVAL", "30s")]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), "data.bin", MIB, 13);
    let mut seeder = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "data.bin"
    ) == 1));
    let loc = locations(tracker.addr, "data.bin");
    let liar = fake_holder(Hostile::Lies, &loc);
    register_fake_holder(tracker.addr, &liar.addr.to_string(), &loc);
    seeder.kill9();

    // With the seeder dead and the liar banned, attempts fail one after another.
    let d = fetching_data_bin(tracker.addr, dir.path());
    assert!(
        wait_until(Duration::from_secs(30), || d
            .metric("shoal_peer_downloads_failed_total")
            >= 3.0),
        "{}",
        d.log_text()
    );
    let _back = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    assert_lands(&original, &dir.path().join("d/data.bin"), &d);
    assert_eq!(
        *liar.connections.lock().unwrap(),
        1,
        "the liar was asked again by a later attempt"
    );
}
