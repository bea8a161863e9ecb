//! The living catalogue, end to end with real processes: files and directories copied into a
//! running seeder reach every follower, a replaced file reaches them as a new version at the
//! cost of about the chunk that changed (and stays the newest after a tracker restart), a
//! deleted file leaves the file list, a file edited in
//! place is never served as good, hostile names from a fake tracker and a fake peer write
//! nothing outside the data dir, and the menu publishes other content under a held name as a
//! new version.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

const CHUNK: usize = 65536;
const LONG: Duration = Duration::from_secs(30);
/// Files are complete once still for this long (the default is longer; tests run faster).
const SETTLE: (&str, &str) = ("SHOAL_SETTLE_TIME", "200ms");

/// The digest a peer computes for `path` in test chunks, hex.
fn digest_of(path: &Path) -> String {
    let (info, _) = shoal::chunking::hash_file(path, "x", Some(CHUNK as u32)).unwrap();
    info.digest.to_hex()
}

/// The digest the tracker lists for `name` (its newest version), if listed.
fn listed_digest(tracker: SocketAddr, name: &str) -> Option<String> {
    let reply = Raw::connect(tracker).ask(r#"{"v":1,"msg":2}"#);
    reply["files"]
        .as_array()?
        .iter()
        .find(|f| f["name"] == name)
        .and_then(|f| f["digest"].as_str().map(String::from))
}

fn downloaded_bytes(p: &Proc) -> f64 {
    p.metric("shoal_peer_downloaded_bytes_total")
}

#[test]
fn files_copied_into_a_running_seeder_reach_every_follower_and_new_versions_cost_a_chunk() {
    let tracker = tracker(&[]);
    let root = tempfile::tempdir().unwrap();
    let seed_dir = root.path().join("seeder");
    std::fs::create_dir_all(&seed_dir).unwrap();
    let seeder = daemon(tracker.addr, &seed_dir, "seeder", &[SETTLE]);
    let followers: Vec<Proc> = (0..3)
        .map(|i| {
            let dir = root.path().join(format!("f{i}"));
            daemon(
                tracker.addr,
                &dir,
                &format!("f{i}"),
                &[("SHOAL_WANT", "*"), SETTLE],
            )
        })
        .collect();

    // Copied in while everything runs: a file, and a nested directory. A peer that only
    // archives keeps the first version of a.bin throughout.
    let staging = root.path().join("staging");
    let a = make_file(&staging, "a.bin", 16 * CHUNK, 1);
    let old_digest = digest_of(&a);
    std::fs::create_dir_all(root.path().join("archive")).unwrap();
    std::fs::copy(&a, root.path().join("archive/a.bin")).unwrap();
    let _archive = daemon(tracker.addr, &root.path().join("archive"), "archive", &[]);
    let shard = make_file(&staging, "shard-1.bin", 5 * CHUNK + 100, 2);
    std::fs::copy(&a, seed_dir.join("a.bin")).unwrap();
    std::fs::create_dir_all(seed_dir.join("models/llama")).unwrap();
    std::fs::copy(&shard, seed_dir.join("models/llama/shard-1.bin")).unwrap();
    for (i, _) in followers.iter().enumerate() {
        let dir = root.path().join(format!("f{i}"));
        assert!(
            wait_until(LONG, || same_bytes(&a, &dir.join("a.bin"))
                && same_bytes(&shard, &dir.join("models/llama/shard-1.bin"))),
            "follower f{i} did not get both files; seeder log:\n{}",
            seeder.log_text()
        );
    }
    assert!(seeder.metric("shoal_peer_versions_published_total") >= 2.0);

    // A new version of a.bin that differs in one chunk, written aside and renamed over.
    let before: Vec<f64> = followers.iter().map(downloaded_bytes).collect();
    let mut data = std::fs::read(&a).unwrap();
    data[7 * CHUNK + 10] ^= 0xff;
    let next = staging.join("a-v2.bin");
    std::fs::write(&next, &data).unwrap();
    std::fs::copy(&next, seed_dir.join(".a.bin.upload")).unwrap();
    std::fs::rename(seed_dir.join(".a.bin.upload"), seed_dir.join("a.bin")).unwrap();
    let new_digest = digest_of(&next);
    for (i, f) in followers.iter().enumerate() {
        let dir = root.path().join(format!("f{i}"));
        assert!(
            wait_until(LONG, || same_bytes(&next, &dir.join("a.bin"))),
            "follower f{i} did not get the new version; its log:\n{}",
            f.log_text()
        );
        let grew = downloaded_bytes(f) - before[i];
        assert!(
            grew < (4 * CHUNK) as f64,
            "f{i} downloaded {grew} bytes for a one-chunk change"
        );
        assert!(f.metric("shoal_peer_chunks_reused_total") >= 15.0);
    }
    assert_eq!(
        listed_digest(tracker.addr, "a.bin").as_deref(),
        Some(new_digest.as_str())
    );
    assert!(
        wait_until(LONG, || followers
            .iter()
            .all(|f| f.metric("shoal_peer_files_withdrawn_total") >= 1.0)),
        "followers should withdraw the old version they replaced"
    );
    for f in &followers {
        assert_eq!(f.metric("shoal_peer_chunk_verify_failures_total"), 0.0);
    }

    // The tracker restarts empty: once the peers have registered again (followers with the
    // stamp they kept as mtime), the new version is still the newest and the old one, which
    // the archive still holds, is listed beside it.
    let addr = tracker.addr;
    drop(tracker);
    let _tracker = tracker_at(addr, &[]);
    let versions = || {
        let reply = Raw::connect(addr).ask(r#"{"v":1,"msg":2,"versions":true}"#);
        let files = reply["files"].as_array().cloned().unwrap_or_default();
        files
            .iter()
            .filter(|f| f["name"] == "a.bin")
            .map(|f| {
                (
                    f["digest"].as_str().unwrap().to_string(),
                    f["latest"] == true,
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(LONG, || versions()
            == vec![(new_digest.clone(), true), (old_digest.clone(), false)]
            && holder_count(addr, "a.bin") == 4),
        "after a tracker restart: {:?}",
        versions()
    );
}

#[test]
fn a_deleted_file_that_only_the_seeder_holds_leaves_the_file_list() {
    let (tracker, seeder, dir, original) = seeded("gone.bin", 3 * CHUNK, 3, &[SETTLE]);
    let kept = make_file(&dir.path().join("s"), "kept.bin", CHUNK, 4);
    assert!(wait_until(LONG, || file_names(tracker.addr)
        .contains(&"kept.bin".to_string())));
    std::fs::remove_file(&original).unwrap();
    assert!(
        wait_until(LONG, || !file_names(tracker.addr)
            .contains(&"gone.bin".to_string())),
        "gone.bin is still listed"
    );
    assert!(file_names(tracker.addr).contains(&"kept.bin".to_string()));
    assert!(kept.exists());
    assert_eq!(seeder.metric("shoal_peer_files_withdrawn_total"), 1.0);
    // The seeder no longer serves it either.
    let reply = Raw::connect(seeder.addr).ask(r#"{"v":1,"msg":5,"file":"gone.bin","index":0}"#);
    assert_eq!(reply["error"], "unknown_file", "{reply}");
}

#[test]
fn a_file_edited_in_place_under_a_seeder_is_never_served_as_good() {
    let limit = ("SHOAL_UPLOAD_LIMIT", "1000000");
    let (tracker, seeder, dir, original) = seeded("live.bin", 32 * CHUNK, 5, &[SETTLE, limit]);
    let fdir = dir.path().join("f");
    let follower = daemon(tracker.addr, &fdir, "f", &[("SHOAL_WANT", "live.bin")]);
    assert!(wait_until(LONG, || follower
        .metric("shoal_peer_downloaded_chunks_total")
        >= 2.0));
    // Rewritten in place, same size, while the follower is fetching it.
    let edited = make_file(&dir.path().join("staging"), "live.bin", 32 * CHUNK, 6);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&original)
        .unwrap();
    file.write_all(&std::fs::read(&edited).unwrap()).unwrap();
    drop(file);
    assert!(
        wait_until(LONG, || same_bytes(&edited, &fdir.join("live.bin"))),
        "the follower should end with the edited file, published as a new version; log:\n{}",
        follower.log_text()
    );
    assert_eq!(
        follower.metric("shoal_peer_chunk_verify_failures_total"),
        0.0,
        "a chunk that fails verification was served"
    );
    assert!(seeder.metric("shoal_peer_files_withdrawn_total") >= 1.0);
    assert_eq!(
        listed_digest(tracker.addr, "live.bin"),
        Some(digest_of(&edited))
    );
}

#[test]
fn the_menu_publishes_other_content_under_a_held_name_as_a_new_version() {
    let tracker = tracker(&[]);
    let root = tempfile::tempdir().unwrap();
    let v1 = make_file(&root.path().join("one"), "x.bin", 2 * CHUNK, 8);
    let v2 = make_file(&root.path().join("two"), "x.bin", 2 * CHUNK, 9);
    let later = std::fs::metadata(&v1).unwrap().modified().unwrap() + Duration::from_secs(60);
    let file = std::fs::File::options().write(true).open(&v2).unwrap();
    file.set_modified(later).unwrap();
    drop(file);
    let v2_path = v2.display().to_string();
    let input = format!("1\n{v2_path}\n1\n{v2_path}\n3\nx.bin\n6\n");
    let (status, out) = run_menu(tracker.addr, root.path(), "menu", &[&v1], &input, LONG);
    assert!(status.success(), "{out}");
    assert!(out.contains("published a new version of x.bin"), "{out}");
    assert!(out.contains("x.bin is already shared, unchanged"), "{out}");
    assert!(
        out.contains(&format!("digest {}; ", digest_of(&v2))),
        "locations should answer the new version:\n{out}"
    );
}

/// What the fake tracker offers: hostile names, and one legitimate file held by a fake peer.
struct Offered {
    hostile: Vec<String>,
    legit: String,
    loc: Value,
}

#[test]
fn hostile_names_from_a_tracker_or_a_peer_write_nothing_outside_the_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let source = make_file(&root.path().join("src"), "ok.bin", 3 * CHUNK, 7);
    let (info, hashes) =
        shoal::chunking::hash_file(&source, "fine/ok.bin", Some(CHUNK as u32)).unwrap();
    let peer = fake_peer(source.clone());
    let abs = root.path().join("abs.bin").display().to_string();
    let offered = Offered {
        hostile: vec![
            "../escape.bin".into(),
            abs.clone(),
            "a/../../b.bin".into(),
            "fine/../../c.bin".into(),
        ],
        legit: "fine/ok.bin".into(),
        loc: json!({
            "file": info, "published": 1, "chunks": 3, "hashes": hashes, "total_peers": 1,
            "peers": [{"addr": peer.to_string(), "name": "fake", "have": "4A=="}],
        }),
    };
    let tracker = fake_tracker(offered);
    let daemon = daemon(tracker, &data, "victim", &[("SHOAL_WANT", "*")]);
    assert!(
        wait_until(LONG, || same_bytes(&source, &data.join("fine/ok.bin"))),
        "the legitimate file should land; log:\n{}",
        daemon.log_text()
    );
    let mut outside: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    outside.sort();
    assert_eq!(outside, vec!["data", "src"], "written outside the data dir");
    assert!(!Path::new(&abs).exists());
    // The hidden files of the download go once it has its name.
    let inside = || {
        let mut all = walk(&data);
        all.sort();
        all
    };
    assert!(
        wait_until(LONG, || inside() == ["fine", "fine/ok.bin"]),
        "{:?}",
        inside()
    );
    // A hostile peer asking it for such names is refused, and it keeps serving.
    let mut raw = Raw::connect(daemon.addr);
    for name in [
        "../ok.bin",
        abs.as_str(),
        "fine/../../ok.bin",
        "fine/./ok.bin",
    ] {
        let req = json!({"v": 1, "msg": 5, "file": name, "index": 0});
        let reply = raw.ask(&req.to_string());
        assert_eq!(reply["error"], "invalid_name", "{name}: {reply}");
    }
    let reply = raw.ask(r#"{"v":1,"msg":5,"file":"fine/ok.bin","index":9}"#);
    assert_eq!(reply["error"], "out_of_range", "{reply}");
}

/// Every path under `dir`, relative, hidden ones included.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()).into_iter().map(|n| format!("{name}/{n}")));
        }
        out.push(name);
    }
    out
}

/// A tracker in the test: lists the hostile names and the legitimate one, answers locations
/// for every name with the legitimate file's entry renamed to the name asked (or, for the
/// legitimate name, with its own), and acknowledges everything else.
fn fake_tracker(offered: Offered) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let offered = std::sync::Arc::new(offered);
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let offered = offered.clone();
            std::thread::spawn(move || answer_all(stream, |req| fake_reply(&offered, req)));
        }
    });
    addr
}

fn fake_reply(offered: &Offered, req: &Value) -> Value {
    let msg = req["msg"].as_u64().unwrap();
    let mut reply = match msg {
        1 => json!({"peer_id": 1, "token": "t", "announce_interval_ms": 1000,
                    "addr": req["addr"], "files": []}),
        2 => {
            let file = &offered.loc["file"];
            let files: Vec<Value> = offered
                .hostile
                .iter()
                .chain([&offered.legit])
                .map(|name| {
                    json!({"name": name, "size": file["size"], "chunk_size": file["chunk_size"],
                           "digest": file["digest"], "chunks": 3, "peers": 1, "seeders": 1,
                           "published": 1, "latest": true})
                })
                .collect();
            json!({ "files": files })
        }
        3 => {
            // The hostile names get the real file's entry under the hostile name: if the peer
            // trusted it, it would write the real bytes there.
            let mut loc = offered.loc.clone();
            loc["file"]["name"] = req["file"].clone();
            loc
        }
        4 => json!({"recorded": 0}),
        _ => json!({}),
    };
    reply["v"] = json!(1);
    reply["msg"] = json!(msg);
    reply["ok"] = json!(true);
    reply
}

/// A peer in the test serving the chunks of `source` under whatever name is asked (a hostile
/// name included), so only the downloader's own checks keep the bytes in the data dir.
fn fake_peer(source: std::path::PathBuf) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let data = std::fs::read(&source).unwrap();
            std::thread::spawn(move || serve_chunks(stream, &data));
        }
    });
    addr
}

fn serve_chunks(stream: TcpStream, data: &[u8]) {
    let mut writer = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        let req: Value = serde_json::from_str(&line).unwrap();
        let index = req["index"].as_u64().unwrap() as usize;
        let body = &data[index * CHUNK..((index + 1) * CHUNK).min(data.len())];
        let hash = shoal::protocol::Hash::of(body).to_hex();
        let header = json!({"v": 1, "msg": 5, "ok": true, "file": req["file"], "index": index,
                            "length": body.len(), "hash": hash});
        if writeln!(writer, "{header}").is_err() || writer.write_all(body).is_err() {
            return;
        }
    }
}

/// Answers each request line on `stream` with `reply(request)`.
fn answer_all(stream: TcpStream, reply: impl Fn(&Value) -> Value) {
    let mut writer = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        let Ok(req) = serde_json::from_str::<Value>(&line) else {
            return;
        };
        if writeln!(writer, "{}", reply(&req)).is_err() {
            return;
        }
    }
}
