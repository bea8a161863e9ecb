//! Hostile and malformed input against both binaries' ports: every case gets a clear error (or
//! the connection is closed), and the process keeps serving everyone else.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;

fn code(reply: &Value) -> &str {
    assert_eq!(reply["ok"], false, "expected a refusal, got {reply}");
    reply["error"].as_str().unwrap()
}

fn offer(name: &str, loc: &Value) -> Value {
    let f = &loc["file"];
    json!({"name": name, "size": f["size"], "chunk_size": f["chunk_size"], "digest": f["digest"], "hashes": loc["hashes"]})
}

/// A tracker with one seeded file "a.bin" (3 chunks) and its locations reply.
fn seeded() -> (Proc, Proc, tempfile::TempDir, Value) {
    let tracker = tracker(&[
        ("SHOAL_MAX_FRAME_BYTES", "65536"),
        ("SHOAL_FRAME_TIMEOUT", "500ms"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    make_file(&dir.path().join("s"), "a.bin", 150_000, 7);
    let seeder = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "a.bin"
    ) == 1));
    let loc = locations(tracker.addr, "a.bin");
    (tracker, seeder, dir, loc)
}

#[test]
fn tracker_refuses_malformed_requests_and_keeps_the_connection() {
    let (tracker, _s, _d, _) = seeded();
    let mut c = Raw::connect(tracker.addr);
    let cases = [
        ("not json at all", "bad_request"),
        (r#"{"v":1}"#, "bad_request"),
        (r#"{"v":1,"msg":42}"#, "unknown_msg"),
        (r#"{"v":9,"msg":2}"#, "unsupported_version"),
        (r#"{"v":1,"msg":3,"file":5}"#, "bad_request"),
        (r#"{"v":1,"msg":3,"file":"a.bin","want":-1}"#, "bad_request"),
        (
            r#"{"v":1,"msg":4,"peer_id":-1,"token":"x","file":"a.bin","chunks":[0]}"#,
            "bad_request",
        ),
        (
            r#"{"v":1,"msg":4,"peer_id":1e400,"token":"x","file":"a.bin","chunks":[0]}"#,
            "bad_request",
        ),
        (
            r#"{"v":1,"msg":4,"peer_id":1,"token":"x","file":"a.bin","chunks":[99999999999]}"#,
            "bad_request",
        ),
        (r#"{"v":1,"msg":5,"file":"a.bin","index":0}"#, "unknown_msg"),
        (
            r#"{"v":1,"msg":1,"name":"p","addr":"not an address"}"#,
            "bad_request",
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(code(&c.ask(line)), expected, "for {line}");
    }
    assert_eq!(
        c.ask(r#"{"v":1,"msg":42}"#)["msg"],
        42,
        "a refusal echoes the message number"
    );
    let list = c.ask(r#"{"v":1,"msg":2}"#);
    assert_eq!(
        list["ok"], true,
        "connection should still serve after refusals: {list}"
    );
    // Unparseable, versionless and unknown-number frames count as "invalid": five of the above.
    assert_eq!(
        tracker.metric(r#"shoal_tracker_requests_total{msg="invalid",outcome="error"}"#),
        5.0
    );
}

/// Sends `line` and returns the refusal's (msg, error code).
fn refusal(c: &mut Raw, line: &str) -> (u64, String) {
    let reply = c.ask(line);
    (reply["msg"].as_u64().unwrap(), code(&reply).to_string())
}

#[test]
fn json_that_is_not_an_object_is_a_bad_request_on_both_sides() {
    let (tracker, seeder, _d, _) = seeded();
    let not_objects = [
        "[1,2]", "[1,5]", "[1,2,3]", "42", "-1", "\"text\"", "null", "true",
    ];
    for addr in [tracker.addr, seeder.addr] {
        let mut c = Raw::connect(addr);
        for line in not_objects {
            assert_eq!(
                refusal(&mut c, line),
                (0, "bad_request".into()),
                "{line} to {addr}"
            );
        }
        assert!(c.ask(r#"{"v":1,"msg":5,"file":"a.bin","index":0}"#)["ok"].is_boolean());
    }
}

#[test]
fn any_version_but_1_is_unsupported_and_a_frame_without_one_is_malformed() {
    let (tracker, seeder, _d, _) = seeded();
    for (addr, msg) in [(tracker.addr, 2), (seeder.addr, 5)] {
        let mut c = Raw::connect(addr);
        for v in ["2", "0", "-1", "1.5", "1.0", "\"1\"", "[1]"] {
            let line = format!(r#"{{"v":{v},"msg":{msg}}}"#);
            let expected = (msg, "unsupported_version".to_string());
            assert_eq!(refusal(&mut c, &line), expected, "{line} to {addr}");
        }
        for line in [
            format!(r#"{{"msg":{msg}}}"#),
            format!(r#"{{"v":null,"msg":{msg}}}"#),
        ] {
            let expected = (msg, "bad_request".to_string());
            assert_eq!(refusal(&mut c, &line), expected, "{line} to {addr}");
        }
    }
}

#[test]
fn over_long_frame_is_refused_before_buffering_and_others_are_served() {
    let (tracker, _s, _d, _) = seeded();
    let mut hog = Raw::connect(tracker.addr);
    let big = vec![b'x'; 1 << 20];
    let _ = hog.stream.write_all(&big); // the tracker may close before taking it all
    let reply = hog.recv().expect("a refusal before the close");
    assert_eq!(code(&reply), "frame_too_long");
    assert!(hog.closed());
    assert_eq!(
        Raw::connect(tracker.addr).ask(r#"{"v":1,"msg":2}"#)["ok"],
        true
    );
}

#[test]
fn half_a_line_that_stalls_is_dropped() {
    let (tracker, _s, _d, _) = seeded();
    let mut c = Raw::connect(tracker.addr);
    c.stream.write_all(br#"{"v":1,"msg":"#).unwrap();
    assert!(c.closed(), "a stalled partial frame must be dropped");
    assert_eq!(
        Raw::connect(tracker.addr).ask(r#"{"v":1,"msg":2}"#)["ok"],
        true
    );
}

#[test]
fn unsafe_names_are_refused_per_file() {
    let (tracker, _s, _d, loc) = seeded();
    let names = [
        "../x",
        "/etc/passwd",
        "a\u{0}b",
        "tab\tname",
        ".hidden",
        &"x".repeat(300),
        "ok.bin",
    ];
    let files: Vec<Value> = names.iter().map(|n| offer(n, &loc)).collect();
    let reg = json!({"v":1,"msg":1,"name":"p","addr":"127.0.0.1:9","files":files});
    let reply = Raw::connect(tracker.addr).ask(&reg.to_string());
    assert_eq!(reply["ok"], true, "{reply}");
    let verdicts = reply["files"].as_array().unwrap();
    for (v, name) in verdicts.iter().zip(names) {
        let expected = if name == "ok.bin" {
            Value::Null
        } else {
            json!("invalid_name")
        };
        assert_eq!(v["error"], expected, "for {name:?}: {v}");
    }
    let mut c = Raw::connect(tracker.addr);
    assert_eq!(
        code(&c.ask(r#"{"v":1,"msg":3,"file":"../a.bin"}"#)),
        "invalid_name"
    );
    assert_eq!(
        code(&c.ask(r#"{"v":1,"msg":3,"file":"nope.bin"}"#)),
        "unknown_file"
    );
}

#[test]
fn same_name_with_different_content_is_a_separate_version() {
    let (tracker, _s, dir, first) = seeded();
    make_file(&dir.path().join("other"), "a.bin", 150_000, 99);
    let _other = daemon(tracker.addr, &dir.path().join("other"), "other", &[]);
    let versions = || {
        let reply = Raw::connect(tracker.addr).ask(r#"{"v":1,"msg":2,"versions":true}"#);
        reply["files"].as_array().cloned().unwrap_or_default()
    };
    assert!(wait_until(Duration::from_secs(10), || versions().len() == 2));
    for version in versions() {
        let digest = version["digest"].as_str().unwrap();
        let loc = Raw::connect(tracker.addr).ask(&format!(
            r#"{{"v":1,"msg":3,"file":"a.bin","digest":"{digest}"}}"#
        ));
        assert_eq!(loc["total_peers"], 1, "the copies must not be mixed: {loc}");
    }
    assert!(versions()
        .iter()
        .any(|v| v["digest"] == first["file"]["digest"]));
}

#[test]
fn chunk_register_is_guarded_by_token_file_and_range() {
    let (tracker, _s, _d, _) = seeded();
    let mut c = Raw::connect(tracker.addr);
    let me = c.ask(r#"{"v":1,"msg":1,"name":"me","addr":"127.0.0.1:9"}"#);
    let other = c.ask(r#"{"v":1,"msg":1,"name":"other","addr":"127.0.0.1:10"}"#);
    let (id, token) = (
        me["peer_id"].as_u64().unwrap(),
        me["token"].as_str().unwrap(),
    );
    let reg = |file: &str, chunks: &str, tok: &str| {
        format!(
            r#"{{"v":1,"msg":4,"peer_id":{id},"token":"{tok}","file":"{file}","chunks":{chunks}}}"#
        )
    };
    assert_eq!(code(&c.ask(&reg("nope.bin", "[0]", token))), "unknown_file");
    assert_eq!(
        code(&c.ask(&reg("a.bin", "[0]", other["token"].as_str().unwrap()))),
        "forbidden"
    );
    assert_eq!(code(&c.ask(&reg("a.bin", "[0,3]", token))), "out_of_range");
    assert_eq!(
        holder_count(tracker.addr, "a.bin"),
        1,
        "a refused request must record nothing"
    );
    assert_eq!(c.ask(&reg("a.bin", "[0,2]", token))["recorded"], 2);
    let leave_other = format!(
        r#"{{"v":1,"msg":6,"peer_id":{id},"token":"{}"}}"#,
        other["token"].as_str().unwrap()
    );
    assert_eq!(
        code(&c.ask(&leave_other)),
        "forbidden",
        "no peer may remove another's entries"
    );
    assert_eq!(holder_count(tracker.addr, "a.bin"), 2);
}

#[test]
fn peer_serves_only_registered_files_and_refuses_the_rest() {
    let (_tracker, seeder, _d, loc) = seeded();
    let mut c = Raw::connect(seeder.addr);
    let ask = |c: &mut Raw, file: &str, index: i64| {
        c.ask(&json!({"v":1,"msg":5,"file":file,"index":index}).to_string())
    };
    assert_eq!(code(&ask(&mut c, "../etc/passwd", 0)), "invalid_name");
    assert_eq!(code(&ask(&mut c, "/etc/passwd", 0)), "invalid_name");
    assert_eq!(code(&ask(&mut c, "other.bin", 0)), "unknown_file");
    assert_eq!(code(&ask(&mut c, "a.bin", 3)), "out_of_range");
    assert_eq!(code(&ask(&mut c, "a.bin", -1)), "bad_request");
    assert_eq!(code(&c.ask(r#"{"v":1,"msg":2}"#)), "unknown_msg");
    assert_eq!(code(&c.ask("}{")), "bad_request");
    let header = ask(&mut c, "a.bin", 2);
    assert_eq!(header["ok"], true, "{header}");
    let body = c.recv_bytes(header["length"].as_u64().unwrap() as usize);
    let hashes = loc["hashes"].as_str().unwrap();
    assert_eq!(header["hash"].as_str().unwrap(), hex_of_hash(hashes, 2));
    assert_eq!(
        blake3::hash(&body).to_hex().as_str(),
        hex_of_hash(hashes, 2),
        "served bytes must match the published hash"
    );
}

#[test]
fn peer_refuses_over_long_requests_and_binary_garbage() {
    let (_tracker, seeder, _d, _) = seeded();
    let mut hog = Raw::connect(seeder.addr);
    let _ = hog.stream.write_all(&[b'y'; 100_000]);
    assert_eq!(code(&hog.recv().expect("refusal")), "frame_too_long");
    assert!(hog.closed());
    let mut noise = Raw::connect(seeder.addr);
    let garbage: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = noise.stream.write_all(&garbage);
    drop(noise);
    let mut c = Raw::connect(seeder.addr);
    assert_eq!(
        c.ask(r#"{"v":1,"msg":5,"file":"a.bin","index":0}"#)["ok"],
        true,
        "peer must keep serving"
    );
}

#[test]
fn an_address_of_another_host_is_refused_unless_the_tracker_allows_it() {
    let strict = tracker(&[]);
    let claim = r#"{"v":1,"msg":1,"name":"p","addr":"127.0.0.2:7401"}"#;
    let reply = Raw::connect(strict.addr).ask(claim);
    assert_eq!(code(&reply), "unauthorized");
    let why = reply["message"].as_str().unwrap();
    assert!(
        why.contains("127.0.0.1") && why.contains("SHOAL_ALLOW_FOREIGN_ADDR"),
        "{why}"
    );
    let dir = tempfile::tempdir().unwrap();
    make_file(dir.path(), "a.bin", 1000, 1);
    let env = [("SHOAL_ADVERTISE", "127.0.0.2:7401")];
    let peer = daemon(strict.addr, dir.path(), "p", &env);
    assert!(wait_until(Duration::from_secs(10), || peer
        .log_contains("SHOAL_ALLOW_FOREIGN_ADDR")));
    assert!(file_names(strict.addr).is_empty(), "nothing was indexed");

    let open = tracker(&[("SHOAL_ALLOW_FOREIGN_ADDR", "true")]);
    let reply = Raw::connect(open.addr).ask(claim);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["addr"], "127.0.0.2:7401");
}

#[test]
fn a_daemon_says_once_that_it_will_not_write_a_name_and_stops_trying() {
    let (tracker, _s, dir, _) = seeded();
    let follower_dir = dir.path().join("f");
    // Something that is not Shoal's already sits under the name.
    std::fs::create_dir_all(follower_dir.join("a.bin")).unwrap();
    let follower = daemon(tracker.addr, &follower_dir, "f", &[("SHOAL_WANT", "*")]);
    // Every pass of the daemon's loop asks for the file list: let it go round many times (a
    // retry came every other pass before).
    let lists = r#"shoal_tracker_requests_total{msg="file_list",outcome="ok"}"#;
    assert!(wait_until(Duration::from_secs(20), || {
        metric_value(&tracker.metrics_text(), lists).unwrap_or(0.0) >= 15.0
    }));
    let refusals = follower
        .log_text()
        .lines()
        .filter(|l| l.contains("refusing to write"))
        .count();
    assert_eq!(refusals, 1, "{}", follower.log_text());
    assert!(follower.log_contains("already exists"));
    assert!(!follower.log_contains("will retry"));
    assert!(follower_dir.join("a.bin").is_dir(), "left as it was");
    assert_eq!(follower.metric("shoal_peer_files_wanted"), 0.0);
}

#[test]
fn a_one_shot_get_refuses_an_unsafe_name_without_asking_anyone() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let out = get_once(tracker.addr, "../escape", dir.path());
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("refusing to write \"../escape\""), "{said}");
    let asked = ["ok", "error"].map(|outcome| {
        let sample =
            format!(r#"shoal_tracker_requests_total{{msg="locations",outcome="{outcome}"}}"#);
        metric_value(&tracker.metrics_text(), &sample).unwrap_or(0.0)
    });
    assert_eq!(asked, [0.0, 0.0], "the tracker was not asked");
}

fn hex_of_hash(hashes_b64: &str, index: usize) -> String {
    use base64::Engine;
    let flat = base64::engine::general_purpose::STANDARD
        .decode(hashes_b64)
        .unwrap();
    flat[index * 32..index * 32 + 32]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
