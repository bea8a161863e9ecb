//! Any request line through the tracker's real handler and index: it must answer with one JSON
//! object that says ok or carries an error code, and never panic. State accumulates across
//! inputs, so sequences of registrations, chunk registrations and leaves are explored too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::config::TrackerConfig;
use shoal::tracker::Tracker;
use std::sync::OnceLock;

static TRACKER: OnceLock<Tracker> = OnceLock::new();

fuzz_target!(|line: &[u8]| {
    let tracker = TRACKER.get_or_init(|| {
        let cfg = TrackerConfig { max_peers: 1000, max_files: 1000, ..TrackerConfig::default() };
        Tracker::from_config(&cfg).expect("no TLS files to read")
    });
    let reply = tracker.handle(line, std::net::Ipv4Addr::LOCALHOST.into(), None);
    let v: serde_json::Value = serde_json::from_slice(&reply).expect("replies are JSON");
    assert!(v["ok"] == true || v["error"].is_string(), "reply without a verdict: {v}");
    assert!(!reply.contains(&b'\n'), "a reply must be one line");
});
