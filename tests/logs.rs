//! JSON logs are JSON all the way down: every line an object, the settings an object, numbers as
//! numbers, no Rust debug text; a daemon's progress lines name the file and its completion line
//! carries size, duration and rate.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

fn lines(p: &Proc) -> Vec<Value> {
    p.log_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn find<'a>(lines: &'a [Value], message: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["message"] == message)
        .unwrap_or_else(|| panic!("no {message:?} line"))
}

#[test]
fn every_json_line_is_an_object_with_typed_fields() {
    let tracker = tracker(&[("SHOAL_SECRET", "hidden")]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), "a.bin", 300_000, 51);
    let secret = [("SHOAL_SECRET", "hidden")];
    let _seeder = daemon(tracker.addr, &dir.path().join("s"), "s", &secret);
    let fetch = [("SHOAL_SECRET", "hidden"), ("SHOAL_WANT", "a.bin")];
    let d = daemon(tracker.addr, &dir.path().join("d"), "d", &fetch);
    assert!(wait_until(Duration::from_secs(20), || d
        .log_contains("download complete")));
    assert!(same_bytes(&original, &dir.path().join("d/a.bin")));

    for p in [&tracker, &d] {
        let all = lines(p);
        assert!(all.iter().all(Value::is_object));
        assert!(!p.log_text().contains("Some("), "{}", p.log_text());
        assert!(!p.log_text().contains("hidden"), "the secret is masked");
    }
    let tracker_lines = lines(&tracker);
    let start = find(&tracker_lines, "starting shoal-tracker");
    assert_eq!(start["config"]["announce_interval"], "1s", "{start}");
    assert_eq!(start["config"]["max_holders"], 50, "{start}");
    assert_eq!(start["config"]["secret"], "***", "{start}");
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));

    let peer_lines = lines(&d);
    let progress: Vec<&Value> = peer_lines
        .iter()
        .filter(|l| l["message"] == "download progress")
        .collect();
    assert!(!progress.is_empty(), "{}", d.log_text());
    for line in progress {
        assert_eq!(line["file"], "a.bin", "{line}");
        assert!(line["percent"].is_u64(), "{line}");
    }
    let done = find(&peer_lines, "download complete");
    assert_eq!(done["size_bytes"], 300_000, "{done}");
    assert_eq!(done["fetched_bytes"], 300_000, "{done}");
    assert!(done["duration_seconds"].as_f64().is_some(), "{done}");
    assert!(
        done["bytes_per_second"].as_u64().is_some_and(|r| r > 0),
        "{done}"
    );
    assert_eq!(done["span"]["file"], "a.bin", "{done}");
}
