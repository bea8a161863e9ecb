//! Faults during transfers, with real processes: holders that die, stall, lie, or cannot be
//! reached. The download must still finish byte-identical from the honest holders.

mod common;
use common::*;
use std::time::Duration;

const MIB: usize = 1 << 20;

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
        .metric("shoal_peer_chunks_downloaded_total")
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
    assert_eq!(d.metric("shoal_peer_chunks_downloaded_total"), 64.0);
}

#[test]
fn lying_holder_is_detected_by_hash_and_dropped() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), "data.bin", 2 * MIB, 11);
    let _s = daemon(
        tracker.addr,
        &dir.path().join("s"),
        "s",
        &[("SHOAL_UPLOAD_LIMIT", "1048576")],
    );
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "data.bin"
    ) == 1));
    let loc = locations(tracker.addr, "data.bin");
    let liar = fake_holder(Hostile::Lies, &loc);
    register_fake_holder(tracker.addr, &liar.addr.to_string(), &loc);

    let d = daemon(
        tracker.addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_WANT", "data.bin")],
    );

    assert!(
        wait_until(Duration::from_secs(60), || same_bytes(
            &original,
            &dir.path().join("d/data.bin")
        )),
        "{}",
        d.log_text()
    );
    assert!(
        d.metric("shoal_peer_chunk_verify_failures_total") >= 1.0,
        "the lie was never seen"
    );
    assert_eq!(
        d.metric("shoal_peer_chunks_downloaded_total"),
        32.0,
        "a bad chunk was counted as downloaded"
    );
    assert_eq!(
        *liar.connections.lock().unwrap(),
        1,
        "a banned liar must not be asked again"
    );
    assert!(d.log_contains("does not match its hash"));
}

#[test]
fn stalled_holder_is_dropped_after_the_chunk_timeout() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), "data.bin", MIB, 12);
    let _s = daemon(
        tracker.addr,
        &dir.path().join("s"),
        "s",
        &[("SHOAL_UPLOAD_LIMIT", "524288")],
    );
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "data.bin"
    ) == 1));
    let loc = locations(tracker.addr, "data.bin");
    let staller = fake_holder(Hostile::Stalls, &loc);
    register_fake_holder(tracker.addr, &staller.addr.to_string(), &loc);

    let d = daemon(
        tracker.addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_WANT", "data.bin"), ("SHOAL_CHUNK_TIMEOUT", "1s")],
    );

    assert!(
        wait_until(Duration::from_secs(60), || same_bytes(
            &original,
            &dir.path().join("d/data.bin")
        )),
        "{}",
        d.log_text()
    );
    assert!(d.log_contains("stalled"), "{}", d.log_text());
    assert!(*staller.connections.lock().unwrap() >= 1);
}

#[test]
fn unreachable_advertised_address_is_skipped() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), "data.bin", MIB, 13);
    let _s = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "data.bin"
    ) == 1));
    let loc = locations(tracker.addr, "data.bin");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    register_fake_holder(tracker.addr, &closed.to_string(), &loc);

    let d = daemon(
        tracker.addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_WANT", "data.bin")],
    );

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
