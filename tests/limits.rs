//! Every limit is explicit and has a policy when reached: a clear refusal, or dropping a
//! connection that misbehaves. The process keeps serving everyone else.

mod common;
use common::*;
use serde_json::json;
use std::io::Write;
use std::time::Duration;

#[test]
fn tracker_at_its_connection_limit_sheds_load_with_busy() {
    let tracker = tracker(&[("SHOAL_MAX_CONNECTIONS", "2")]);
    let mut a = Raw::connect(tracker.addr);
    let mut b = Raw::connect(tracker.addr);
    assert_eq!(a.ask(r#"{"v":1,"msg":2}"#)["ok"], true);
    assert_eq!(b.ask(r#"{"v":1,"msg":2}"#)["ok"], true);

    let mut c = Raw::connect(tracker.addr);
    let reply = c.recv().expect("a busy refusal");
    assert_eq!(reply["error"], "busy", "{reply}");
    assert!(c.closed());

    drop(a);
    assert!(wait_until(Duration::from_secs(5), || Raw::connect(
        tracker.addr
    )
    .recv_timeout_is_silent()));
    assert_eq!(
        b.ask(r#"{"v":1,"msg":2}"#)["ok"],
        true,
        "existing connections keep working"
    );
}

#[test]
fn peer_at_its_connection_limit_sheds_load_with_busy() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    make_file(dir.path(), "a.bin", 100_000, 50);
    let peer = daemon(
        tracker.addr,
        dir.path(),
        "p",
        &[("SHOAL_MAX_CONNECTIONS", "1")],
    );
    let mut a = Raw::connect(peer.addr);
    assert_eq!(
        a.ask(r#"{"v":1,"msg":5,"file":"a.bin","index":1}"#)["ok"],
        true
    );
    let mut b = Raw::connect(peer.addr);
    assert_eq!(b.recv().expect("a busy refusal")["error"], "busy");
}

#[test]
fn idle_connections_are_closed() {
    let tracker = tracker(&[("SHOAL_IDLE_TIMEOUT", "300ms")]);
    let mut c = Raw::connect(tracker.addr);
    assert_eq!(c.ask(r#"{"v":1,"msg":2}"#)["ok"], true);
    assert!(c.closed(), "an idle connection must be closed");
}

#[test]
fn locations_reply_is_capped_at_max_holders() {
    let tracker = tracker(&[("SHOAL_MAX_HOLDERS", "2")]);
    let dir = tempfile::tempdir().unwrap();
    let offer = offer_for(&make_file(dir.path(), "a.bin", 50_000, 51), 4096);
    for port in 1..=5 {
        let reg =
            json!({"v":1,"msg":1,"name":"p","addr":format!("127.0.0.1:{port}"),"files":[offer]});
        assert_eq!(
            Raw::connect(tracker.addr).ask(&reg.to_string())["files"][0]["accepted"],
            true
        );
    }
    let mut c = Raw::connect(tracker.addr);
    let loc = c.ask(r#"{"v":1,"msg":3,"file":"a.bin","want":10}"#);
    assert_eq!(
        (
            loc["total_peers"].as_u64(),
            loc["peers"].as_array().unwrap().len()
        ),
        (Some(5), 2)
    );
    let loc = c.ask(r#"{"v":1,"msg":3,"file":"a.bin","want":1}"#);
    assert_eq!(loc["peers"].as_array().unwrap().len(), 1);
}

#[test]
fn files_per_peer_and_chunks_per_file_are_capped() {
    let tracker = tracker(&[
        ("SHOAL_MAX_FILES_PER_PEER", "2"),
        ("SHOAL_MAX_CHUNKS_PER_FILE", "4"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let small: Vec<_> = (0..3)
        .map(|i| {
            offer_for(
                &make_file(dir.path(), &format!("f{i}"), 10_000, 52 + i),
                4096,
            )
        })
        .collect();
    let big = offer_for(&make_file(dir.path(), "big", 5 * 4096, 60), 4096);
    let reg = json!({"v":1,"msg":1,"name":"p","addr":"127.0.0.1:9","files":[big, small[0], small[1], small[2]]});
    let reply = Raw::connect(tracker.addr).ask(&reg.to_string());
    let errors: Vec<_> = reply["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["error"].clone())
        .collect();
    assert_eq!(
        errors,
        vec![
            json!("limit_reached"),
            json!(null),
            json!(null),
            json!("limit_reached")
        ]
    );
    assert!(reply["files"][0]["message"]
        .as_str()
        .unwrap()
        .contains("4 per file"));
}

#[test]
fn a_flood_of_registrations_is_bounded_by_max_peers() {
    // Leases long enough that no fake peer expires during the test.
    let tracker = tracker(&[
        ("SHOAL_MAX_PEERS", "100"),
        ("SHOAL_ANNOUNCE_INTERVAL", "60s"),
    ]);
    let mut refused = 0;
    for conn in 0..10 {
        let mut c = Raw::connect(tracker.addr);
        for i in 0..30 {
            let reply = c.ask(&format!(
                r#"{{"v":1,"msg":1,"name":"fake{conn}-{i}","addr":"127.0.0.1:9"}}"#
            ));
            if reply["ok"] == false {
                assert_eq!(reply["error"], "limit_reached", "{reply}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 200);
    assert_eq!(tracker.metric("shoal_tracker_peers"), 100.0);
    assert_eq!(
        Raw::connect(tracker.addr).ask(r#"{"v":1,"msg":2}"#)["ok"],
        true,
        "still serving"
    );
}

#[test]
fn pipelined_requests_are_answered_one_by_one_in_order() {
    let tracker = tracker(&[]);
    let mut c = Raw::connect(tracker.addr);
    let mut batch = String::new();
    for i in 0..200 {
        if i % 2 == 0 {
            batch += "{\"v\":1,\"msg\":2}\n";
        } else {
            batch += &format!("{{\"v\":1,\"msg\":3,\"file\":\"missing{i}\"}}\n");
        }
    }
    c.stream.write_all(batch.as_bytes()).unwrap();
    for i in 0..200 {
        let reply = c.recv().expect("every pipelined request gets its reply");
        let expected = if i % 2 == 0 { 2 } else { 3 };
        assert_eq!(reply["msg"], expected, "reply {i} out of order: {reply}");
        if i % 2 == 1 {
            assert!(reply["message"]
                .as_str()
                .unwrap()
                .contains(&format!("missing{i}")));
        }
    }
}

#[test]
fn a_request_that_cannot_get_an_upload_slot_is_refused_busy_not_queued_behind_a_stall() {
    // One slot; a 16 MiB chunk cannot fit in the socket buffers of a requester that never reads
    // (a peer cut off the network looks the same), so its send stalls with the slot held.
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(dir.path(), "big.bin", 16 << 20, 51);
    let peer = daemon(
        tracker.addr,
        dir.path(),
        "p",
        &[
            ("SHOAL_CHUNK_SIZE", "16777216"),
            ("SHOAL_UPLOAD_SLOTS", "1"),
            ("SHOAL_CHUNK_TIMEOUT", "3s"),
            ("SHOAL_LOG", "shoal=debug"),
        ],
    );
    let request = r#"{"v":1,"msg":5,"file":"big.bin","index":0}"#;
    let mut stalled = Raw::connect(peer.addr);
    stalled.send(request);
    assert!(wait_until(Duration::from_secs(5), || {
        peer.metric("shoal_peer_active_transfers") == 1.0
    }));

    // Someone queued behind it is told to go elsewhere within a third of the chunk timeout.
    let mut queued = Raw::connect(peer.addr);
    let refusal = queued.ask(request);
    assert_eq!(refusal["error"], "busy", "{refusal}");
    assert_eq!(
        peer.metric("shoal_peer_chunk_requests_refused_total{reason=\"busy\"}"),
        1.0
    );

    // A requester that gives up while queued is dropped, not served into a closed socket.
    let mut quitter = Raw::connect(peer.addr);
    quitter.send(request);
    quitter.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || peer
            .log_contains("closed by peer while queued")),
        "{}",
        peer.log_text()
    );

    // The stalled send is cut at the chunk timeout, and the slot serves a live requester.
    let mut live = Raw::connect(peer.addr);
    let header = loop {
        let reply = live.ask(request);
        if reply["ok"] == true {
            break reply;
        }
        assert_eq!(reply["error"], "busy", "{reply}");
    };
    assert_eq!(header["length"], 16 << 20);
    assert!(live.recv_bytes(16 << 20) == std::fs::read(&original).unwrap());
    drop(stalled);
}
