//! The core swarm, end to end with real processes: the seed's menu, multi-source downloads, and
//! peers that become sources for later peers.

mod common;
use common::*;
use shoal::bitfield::{Bitfield, WireBits};
use std::time::Duration;

#[test]
fn seed_menu_downloads_a_file_from_two_sources_byte_identical() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s1"), "movie.bin", 4 << 20, 1);
    std::fs::create_dir_all(dir.path().join("s2")).unwrap();
    std::fs::copy(&original, dir.path().join("s2/movie.bin")).unwrap();
    let s1 = daemon(tracker.addr, &dir.path().join("s1"), "s1", &[]);
    let s2 = daemon(tracker.addr, &dir.path().join("s2"), "s2", &[]);
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "movie.bin"
    ) == 2));

    let client = dir.path().join("client");
    std::fs::create_dir_all(&client).unwrap();
    let (status, out) = run_menu(
        tracker.addr,
        &client,
        "client2",
        &[],
        "2\n5\nmovie.bin\n3\nmovie.bin\n6\n",
        Duration::from_secs(60),
    );

    assert!(
        status.success(),
        "menu exited with {status}; output:\n{out}"
    );
    assert!(
        out.contains("movie.bin") && out.contains("4.0 MiB"),
        "file list missing:\n{out}"
    );
    assert!(out.contains("downloaded movie.bin"), "{out}");
    assert!(same_bytes(&original, &client.join("movie.bin")));
    assert!(
        out.contains(&format!("{} (s1) chunks: all 64", s1.addr)),
        "locations should list s1 as ip:port:\n{out}"
    );
    // Both holders served: 64 chunks in all, at least one each (endgame may add duplicates).
    let uploads = |p: &Proc| p.metric("shoal_peer_uploaded_chunks_total");
    assert!(wait_until(Duration::from_secs(5), || uploads(&s1)
        + uploads(&s2)
        >= 64.0));
    assert!(
        uploads(&s1) >= 1.0 && uploads(&s2) >= 1.0,
        "s1 {} s2 {}",
        uploads(&s1),
        uploads(&s2)
    );
    let leftovers: Vec<_> = std::fs::read_dir(&client)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec![std::ffi::OsString::from("movie.bin")],
        "partial files left behind"
    );
}

#[test]
fn later_peers_fetch_from_earlier_downloaders_once_the_seeder_is_gone() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("seed"), "model.bin", 3 << 20, 2);
    let mut seeder = daemon(tracker.addr, &dir.path().join("seed"), "seed", &[]);
    let first = daemon(
        tracker.addr,
        &dir.path().join("first"),
        "first",
        &[("SHOAL_WANT", "model.bin")],
    );
    assert!(wait_until(Duration::from_secs(30), || same_bytes(
        &original,
        &dir.path().join("first/model.bin")
    )));
    // The file gets its name a moment before the download is counted.
    assert!(wait_until(Duration::from_secs(5), || first
        .metric("shoal_peer_downloads_completed_total")
        == 1.0));

    seeder.kill9();
    let later = dir.path().join("later");
    let status = get_once(tracker.addr, "model.bin", &later).status;
    assert!(status.success(), "get exited with {status}");
    assert!(same_bytes(&original, &later.join("model.bin")));
    assert!(
        first.metric("shoal_peer_uploaded_chunks_total") >= 48.0,
        "the first downloader should have served it all"
    );
}

#[test]
fn one_shot_commands_have_meaningful_exit_codes() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    make_file(&dir.path().join("s"), "a.bin", 100_000, 3);
    let _s = daemon(tracker.addr, &dir.path().join("s"), "s", &[]);
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        "a.bin"
    ) == 1));
    let run = |args: &[&str]| {
        let out = std::process::Command::new(PEER)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let t = tracker.addr.to_string();
    let (code, out) = run(&["files", "--tracker", &t]);
    assert_eq!(code, Some(0));
    assert!(out.contains("a.bin") && out.contains("97.7 KiB"), "{out}");
    let (code, out) = run(&["locate", "a.bin", "--tracker", &t]);
    assert_eq!(code, Some(0));
    assert!(out.contains("chunks: all 2"), "{out}");
    assert_eq!(run(&["locate", "missing.bin", "--tracker", &t]).0, Some(4));
    assert_eq!(
        run(&[
            "get",
            "missing.bin",
            "--tracker",
            &t,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap()
        ])
        .0,
        Some(4)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    assert_eq!(run(&["files", "--tracker", &closed]).0, Some(3));
    assert_eq!(
        run(&["files", "--tracker", &t, "--chunk-size", "banana"]).0,
        Some(2)
    );
}

#[test]
fn an_origin_sends_every_chunk_once_before_any_twice() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    make_file(dir.path(), "four.bin", 4 * 65536, 4);
    let origin = daemon(tracker.addr, dir.path(), "origin", &[]);
    let mut c = Raw::connect(origin.addr);
    // Asks for chunk `i` as peer `me` (or as nobody in particular).
    let mut ask = |i: u32, me: Option<u64>| {
        let mut req = serde_json::json!({"v":1,"msg":5,"file":"four.bin","index":i});
        if let Some(id) = me {
            req["peer_id"] = id.into();
        }
        let reply = c.ask(&req.to_string());
        if reply["ok"] == true {
            c.recv_bytes(65536);
        }
        reply
    };
    assert_eq!(ask(0, Some(1))["ok"], true);
    assert_eq!(
        ask(0, Some(2))["error"],
        "elsewhere",
        "chunk 0 just went out while 1-3 never did"
    );
    assert_eq!(
        ask(0, None)["error"],
        "elsewhere",
        "a requester without a peer id may be any peer"
    );
    assert_eq!(
        ask(0, Some(1))["ok"],
        true,
        "the peer that got chunk 0 asks again because it lost it: nobody else has it from here"
    );
    for i in 1..4 {
        assert_eq!(ask(i, Some(2))["ok"], true);
    }
    assert_eq!(
        ask(0, Some(2))["ok"],
        true,
        "once every chunk went out, the origin serves freely"
    );
}

#[test]
fn the_menu_asks_again_for_a_blank_name_and_prints_sizes_for_people() {
    let (tracker, _seeder, dir, _) = seeded("a.bin", 100_000, 5, &[]);
    let client = dir.path().join("client");
    std::fs::create_dir_all(&client).unwrap();
    let (status, out) = run_menu(
        tracker.addr,
        &client,
        "c",
        &[],
        "3\n\n  \na.bin\n6\n",
        Duration::from_secs(30),
    );
    assert!(status.success(), "{out}");
    assert_eq!(out.matches("file name is empty").count(), 2, "{out}");
    assert!(!out.contains("unknown choice"), "{out}");
    assert!(
        out.contains("a.bin: 97.7 KiB, 2 chunks of 64.0 KiB") && out.contains("; 1 holder\n"),
        "{out}"
    );
}

#[test]
fn an_empty_file_is_shared_listed_located_and_downloaded() {
    let (tracker, _seeder, dir, _) = seeded("empty.txt", 0, 1, &[]);
    assert!(file_names(tracker.addr).contains(&"empty.txt".to_string()));
    let loc = locations(tracker.addr, "empty.txt");
    assert_eq!(
        (&loc["chunks"], &loc["hashes"], &loc["file"]["size"]),
        (&0.into(), &"".into(), &0.into()),
        "{loc}"
    );

    let got = dir.path().join("got");
    let status = get_once(tracker.addr, "empty.txt", &got).status;
    assert!(status.success(), "get exited with {status}");
    let left: Vec<_> = std::fs::read_dir(&got)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["empty.txt"], "the file and nothing else");
    assert_eq!(std::fs::metadata(got.join("empty.txt")).unwrap().len(), 0);

    let follower_dir = dir.path().join("f");
    let _follower = daemon(tracker.addr, &follower_dir, "f", &[("SHOAL_WANT", "*")]);
    assert!(wait_until(Duration::from_secs(10), || follower_dir
        .join("empty.txt")
        .is_file()));
    assert!(
        wait_until(Duration::from_secs(10), || holder_count(
            tracker.addr,
            "empty.txt"
        ) == 2),
        "a peer that fetched an empty file holds it too"
    );
}

#[test]
fn a_holder_tells_a_waiting_downloader_of_each_chunk_it_gains() {
    // The seeder sends 256 KiB/s, so the downloader gains its 16 chunks one by one.
    let limit = [("SHOAL_UPLOAD_LIMIT", "262144")];
    let (tracker, seeder, dir, original) = seeded("news.bin", 1 << 20, 5, &limit);
    let digest = listed_digest(tracker.addr, "news.bin");
    let ask = |held: u64, wait_ms: u64| {
        format!(
            r#"{{"v":1,"msg":10,"file":"news.bin","digest":"{digest}","held":{held},"wait_ms":{wait_ms}}}"#
        )
    };

    // A downloader answers each wait as soon as a further chunk lands there.
    let copy = dir.path().join("d");
    let downloader = daemon(tracker.addr, &copy, "d", &[("SHOAL_WANT", "news.bin")]);
    let mut to_downloader = Raw::connect(downloader.addr);
    assert!(
        wait_until(Duration::from_secs(10), || to_downloader.ask(&ask(0, 0))
            ["ok"]
            == true),
        "the downloader never knew the file"
    );
    let mut held = 0;
    let mut news = 0;
    while held < 16 && news < 64 {
        let reply = to_downloader.ask(&ask(held, 10_000));
        assert_eq!(reply["ok"], true, "{reply}");
        let now = reply["held"].as_u64().unwrap();
        let have: WireBits = serde_json::from_value(reply["have"].clone()).unwrap();
        let bits = Bitfield::from_bytes(have.0, 16).expect("16 bits");
        assert_eq!(bits.count() as u64, now, "{reply}");
        assert!(now > held, "answered without news: {reply}");
        held = now;
        news += 1;
    }
    assert_eq!(held, 16);
    assert!(news >= 2, "the downloader gained its chunks in one go");
    assert_lands(&original, &copy.join("news.bin"), &downloader);
    assert!(downloader.metric("shoal_peer_haves_sent_total") >= news as f64);

    // A complete holder that holds more than the asker knows answers with all of it.
    let mut to_seeder = Raw::connect(seeder.addr);
    let all = to_seeder.ask(&ask(0, 10_000));
    assert_eq!(
        (all["ok"].as_bool(), all["held"].as_u64()),
        (Some(true), Some(16)),
        "{all}"
    );
    assert_eq!(all["have"], "//8=", "{all}");
    // With nothing new, a chunk request that follows ends the wait; both are answered in order.
    to_seeder.send(&ask(16, 10_000));
    to_seeder.send(r#"{"v":1,"msg":5,"file":"news.bin","index":3}"#);
    let same = to_seeder.recv().expect("the reply to message 10");
    assert_eq!(
        (same["msg"].as_u64(), same["held"].as_u64()),
        (Some(10), Some(16)),
        "{same}"
    );
    let header = to_seeder.recv().expect("the chunk header");
    assert_eq!(
        (header["msg"].as_u64(), header["index"].as_u64()),
        (Some(5), Some(3)),
        "{header}"
    );
    to_seeder.recv_bytes(65536);
    // With `want`, holding one of the wanted chunks is news, whatever `held` says.
    let wanted = ask(16, 10_000).replace('}', r#","want":"gAA="}"#);
    let news = to_seeder.ask(&wanted);
    assert_eq!(
        (news["ok"].as_bool(), news["held"].as_u64()),
        (Some(true), Some(16)),
        "{news}"
    );
    let too_short = to_seeder.ask(&ask(0, 0).replace('}', r#","want":"gA=="}"#));
    assert_eq!(too_short["error"], "out_of_range", "{too_short}");
    let other = to_seeder.ask(&ask(0, 0).replace(&digest, &"ab".repeat(32)));
    assert_eq!(other["error"], "unknown_file", "{other}");
}
