//! File versions with real processes: one name with several contents is several versions, the
//! newest is the one with the later stamp (then the higher digest), older ones stay reachable by
//! digest, the order survives a tracker restart, and hostile names never get in.

mod common;
use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Runs `shoal-peer ARGS --tracker T`; returns (exit code, stdout, stderr).
fn peer_cmd(tracker: SocketAddr, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(PEER)
        .args(args)
        .args(["--tracker", &tracker.to_string()])
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The JSON a successful `shoal-peer ARGS` printed.
fn peer_json(tracker: SocketAddr, args: &[&str]) -> Value {
    let (code, out, err) = peer_cmd(tracker, args);
    assert_eq!(code, Some(0), "shoal-peer {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `files --json --all-versions`, or an empty list while the tracker is down.
fn all_versions(tracker: SocketAddr) -> Vec<Value> {
    let (code, out, _) = peer_cmd(tracker, &["files", "--json", "--all-versions"]);
    if code != Some(0) {
        return Vec::new();
    }
    serde_json::from_str::<Vec<Value>>(&out).unwrap()
}

/// Registers `path` as a file of a peer at `addr`, stamped `published`, from a raw client.
fn publish(tracker: SocketAddr, peer: &str, addr: &str, path: &Path, published: u64) {
    let mut offer = offer_for(path, 65536);
    offer["published"] = json!(published);
    let reg = json!({"v":1,"msg":1,"name":peer,"addr":addr,"files":[offer]});
    let reply = Raw::connect(tracker).ask(&reg.to_string());
    assert_eq!(reply["files"][0]["accepted"], true, "{reply}");
}

fn digest_of(path: &Path) -> String {
    offer_for(path, 65536)["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_later_stamp_is_listed_and_the_older_version_stays_locatable_by_digest() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let one = make_file(&dir.path().join("one"), "model.bin", 200_000, 1);
    let two = make_file(&dir.path().join("two"), "model.bin", 200_000, 2);
    // The later stamp goes to the lower digest, so that only the stamp can make it the newest.
    let (mut newer, mut older) = (one, two);
    if digest_of(&newer) > digest_of(&older) {
        std::mem::swap(&mut newer, &mut older);
    }
    publish(tracker.addr, "old", "127.0.0.1:9001", &older, 1_000_000);
    publish(tracker.addr, "new", "127.0.0.1:9002", &newer, 2_000_000);

    let listed = peer_json(tracker.addr, &["files", "--json"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "one entry per name: {listed:?}");
    let entry = &listed[0];
    assert_eq!(entry["name"], "model.bin");
    assert_eq!(entry["digest"], digest_of(&newer));
    assert_eq!(
        (entry["published"].as_u64(), entry["latest"].as_bool()),
        (Some(2_000_000), Some(true))
    );
    assert_eq!(
        (entry["size"].as_u64(), entry["chunks"].as_u64()),
        (Some(200_000), Some(4))
    );
    assert_eq!(
        (entry["peers"].as_u64(), entry["seeders"].as_u64()),
        (Some(1), Some(1))
    );

    let every: Vec<_> = all_versions(tracker.addr)
        .iter()
        .map(|v| {
            (
                v["digest"].as_str().unwrap().to_string(),
                v["latest"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        every,
        [(digest_of(&newer), true), (digest_of(&older), false)]
    );

    let old_digest = digest_of(&older);
    let loc = peer_json(
        tracker.addr,
        &["locate", "model.bin", "--digest", &old_digest, "--json"],
    );
    assert_eq!(
        (loc["digest"].as_str(), loc["published"].as_u64()),
        (Some(old_digest.as_str()), Some(1_000_000))
    );
    assert_eq!(
        loc["peers"],
        json!([{"addr": "127.0.0.1:9001", "name": "old", "chunks": [[0, 3]]}])
    );
    let newest = peer_json(tracker.addr, &["locate", "model.bin", "--json"]);
    assert_eq!(newest["digest"], digest_of(&newer));
    assert_eq!(newest["peers"][0]["name"], "new");
}

#[test]
fn get_pins_a_version_by_digest_and_exits_4_when_the_swarm_lacks_it() {
    let (tracker, _seeder, dir, original) = seeded("a.bin", 300_000, 7, &[]);
    let pinned = |digest: &str, into: &str| {
        let data = dir.path().join(into);
        let args = [
            "get",
            "a.bin",
            "--digest",
            digest,
            "--listen",
            "127.0.0.1:0",
        ];
        let data_dir = ["--data-dir", data.to_str().unwrap()];
        peer_cmd(tracker.addr, &[&args[..], &data_dir[..]].concat())
    };

    let unknown = "ab".repeat(32);
    let (code, _, err) = pinned(&unknown, "missing");
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains(&unknown), "the error names the version: {err}");
    assert!(!dir.path().join("missing/a.bin").exists());

    let (code, _, err) = pinned("not-a-digest", "bad");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("64 hex digits"), "{err}");

    let (code, out, err) = pinned(&digest_of(&original), "fetched");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("a.bin"), "{out}");
    assert!(same_bytes(&original, &dir.path().join("fetched/a.bin")));
}

#[test]
fn a_restarted_tracker_lists_the_same_newest_version_after_peers_register_again() {
    let mut tracker = tracker(&[]);
    let addr = tracker.addr;
    let dir = tempfile::tempdir().unwrap();
    for (seed, dir_name) in [(11, "s1"), (12, "s2")] {
        let path = make_file(&dir.path().join(dir_name), "shared.bin", 150_000, seed);
        // A seeder stamps its version with the file's mtime: give the two different ones.
        let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seed * 60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }
    let _s1 = daemon(addr, &dir.path().join("s1"), "s1", &[]);
    let _s2 = daemon(addr, &dir.path().join("s2"), "s2", &[]);
    assert!(wait_until(Duration::from_secs(10), || all_versions(addr)
        .len()
        == 2));
    let newest = peer_json(addr, &["files", "--json"])[0]["digest"].clone();

    tracker.kill9();
    let _restarted = tracker_at(addr, &[]);
    assert!(
        wait_until(Duration::from_secs(15), || all_versions(addr).len() == 2),
        "both seeders register their version again"
    );
    let listed = peer_json(addr, &["files", "--json"]);
    assert_eq!(listed[0]["digest"], newest, "{listed}");
    assert_eq!(listed[0]["latest"], true);
}

#[test]
fn hostile_names_are_refused_by_the_tracker_with_invalid_name() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = make_file(dir.path(), "x", 10_000, 3);
    let mut c = Raw::connect(tracker.addr);
    let me = c.ask(r#"{"v":1,"msg":1,"name":"me","addr":"127.0.0.1:9"}"#);
    let (id, token) = (me["peer_id"].clone(), me["token"].clone());
    let digest = digest_of(&file);
    for name in [
        "../x",
        "/etc/passwd",
        "a//b",
        "a/.b",
        "a\\b",
        "a/../../x",
        "nul\u{0}",
    ] {
        let mut offer = offer_for(&file, 65536);
        offer["name"] = json!(name);
        let reg = json!({"v":1,"msg":1,"name":"me","addr":"127.0.0.1:9","peer_id":id,"token":token,"files":[offer]});
        let verdict = &c.ask(&reg.to_string())["files"][0];
        assert_eq!(verdict["error"], "invalid_name", "{name:?}: {verdict}");
        let locate = json!({"v":1,"msg":3,"file":name,"digest":digest});
        assert_eq!(
            c.ask(&locate.to_string())["error"],
            "invalid_name",
            "{name:?}"
        );
        let withdraw =
            json!({"v":1,"msg":8,"peer_id":id,"token":token,"file":name,"digest":digest});
        assert_eq!(
            c.ask(&withdraw.to_string())["error"],
            "invalid_name",
            "{name:?}"
        );
    }
    assert!(
        file_names(tracker.addr).is_empty(),
        "nothing hostile was indexed"
    );

    let mut nested = offer_for(&file, 65536);
    nested["name"] = json!("models/llama-3/shard-00001.bin");
    let reg = json!({"v":1,"msg":1,"name":"me","addr":"127.0.0.1:9","peer_id":id,"token":token,"files":[nested]});
    assert_eq!(c.ask(&reg.to_string())["files"][0]["accepted"], true);
    assert_eq!(file_names(tracker.addr), ["models/llama-3/shard-00001.bin"]);
    let withdraw = json!({"v":1,"msg":8,"peer_id":id,"token":token,"file":"models/llama-3/shard-00001.bin","digest":digest});
    assert_eq!(c.ask(&withdraw.to_string())["ok"], true);
    assert!(
        file_names(tracker.addr).is_empty(),
        "a version nobody holds leaves"
    );
}
