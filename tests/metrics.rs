//! Metrics tell the truth: counters equal what really moved, every endpoint passes
//! `promtool check metrics`, and the dashboard only queries metrics the binaries export.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const CHUNK: f64 = 65536.0;

#[test]
fn one_source_uploads_exactly_what_one_downloader_downloads() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("seed"), "f.bin", 1_500_000, 40);
    let seeder = daemon(tracker.addr, &dir.path().join("seed"), "seed", &[]);
    let d = daemon(
        tracker.addr,
        &dir.path().join("d"),
        "d",
        &[("SHOAL_WANT", "f.bin")],
    );
    assert!(wait_until(Duration::from_secs(30), || same_bytes(
        &original,
        &dir.path().join("d/f.bin")
    )));
    let chunks = (1_500_000f64 / CHUNK).ceil();
    assert!(wait_until(Duration::from_secs(5), || seeder
        .metric("shoal_peer_chunks_uploaded_total")
        == chunks));
    assert_eq!(
        seeder.metric("shoal_peer_bytes_uploaded_total"),
        1_500_000.0
    );
    assert_eq!(d.metric("shoal_peer_chunks_downloaded_total"), chunks);
    assert_eq!(d.metric("shoal_peer_bytes_downloaded_total"), 1_500_000.0);
    assert_eq!(d.metric("shoal_peer_chunks_duplicate_total"), 0.0);
    assert_eq!(
        tracker.metric("shoal_tracker_chunk_registrations_total"),
        chunks
    );
}

#[test]
fn swarm_counters_equal_the_real_transfers() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sizes = [("one.bin", 1_000_000usize), ("two.bin", 300_000)];
    let originals: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, (n, len))| make_file(&dir.path().join("seed"), n, *len, 30 + i as u64))
        .collect();
    let seeder = daemon(tracker.addr, &dir.path().join("seed"), "seed", &[]);
    assert!(wait_until(Duration::from_secs(10), || file_names(
        tracker.addr
    )
    .len()
        == 2));
    let peers: Vec<Proc> = (0..3)
        .map(|i| {
            daemon(
                tracker.addr,
                &dir.path().join(format!("p{i}")),
                &format!("p{i}"),
                &[("SHOAL_WANT", "*")],
            )
        })
        .collect();
    for i in 0..3 {
        for o in &originals {
            let copy = dir
                .path()
                .join(format!("p{i}"))
                .join(o.file_name().unwrap());
            assert!(
                wait_until(Duration::from_secs(30), || same_bytes(o, &copy)),
                "p{i} never got {}",
                o.display()
            );
        }
    }

    let total_bytes: f64 = sizes.iter().map(|(_, l)| *l as f64).sum();
    let total_chunks: f64 = sizes.iter().map(|(_, l)| (*l as f64 / CHUNK).ceil()).sum();
    for p in &peers {
        assert!(wait_until(Duration::from_secs(5), || p
            .metric("shoal_peer_downloads_completed_total")
            == 2.0));
        assert_eq!(p.metric("shoal_peer_bytes_downloaded_total"), total_bytes);
        assert_eq!(p.metric("shoal_peer_chunks_downloaded_total"), total_chunks);
        assert_eq!(
            p.metric("shoal_peer_chunk_transfer_duration_seconds_count"),
            total_chunks
        );
        assert_eq!(p.metric("shoal_peer_download_duration_seconds_count"), 2.0);
        assert_eq!(p.metric("shoal_peer_chunk_verify_failures_total"), 0.0);
        assert_eq!(p.metric("shoal_peer_downloads_failed_total"), 0.0);
        assert_eq!(p.metric("shoal_peer_files_shared"), 2.0);
    }
    // Every chunk sent in full was either counted as downloaded or as a duplicate, except
    // endgame requests still on the wire when a download completed (there is no cancel).
    let everyone: Vec<&Proc> = std::iter::once(&seeder).chain(&peers).collect();
    let sum = |name: &str| everyone.iter().map(|p| p.metric(name)).sum::<f64>();
    let received =
        sum("shoal_peer_chunks_downloaded_total") + sum("shoal_peer_chunks_duplicate_total");
    assert_eq!(
        sum("shoal_peer_chunks_downloaded_total"),
        3.0 * total_chunks
    );
    let ok = wait_until(Duration::from_secs(5), || {
        let sent = sum("shoal_peer_chunks_uploaded_total");
        sent >= received && sent <= received + 2.0 * 3.0
    });
    assert!(
        ok,
        "sent {} received {received}",
        sum("shoal_peer_chunks_uploaded_total")
    );
    assert_eq!(seeder.metric("shoal_peer_files_shared"), 2.0);
    let idle = || {
        everyone
            .iter()
            .all(|p| p.metric("shoal_peer_active_transfers") == 0.0)
    };
    assert!(
        wait_until(Duration::from_secs(5), idle),
        "transfers still counted as active after the swarm settled"
    );
    // The tracker saw one registration per process and every downloaded chunk once.
    assert_eq!(tracker.metric("shoal_tracker_registrations_total"), 4.0);
    assert!(wait_until(Duration::from_secs(5), || tracker
        .metric("shoal_tracker_chunk_registrations_total")
        == 3.0 * total_chunks));
    assert_eq!(tracker.metric("shoal_tracker_peers"), 4.0);
    assert_eq!(tracker.metric("shoal_tracker_files"), 2.0);

    for p in everyone.iter().copied().chain(std::iter::once(&tracker)) {
        promtool_accepts(&p.metrics_text());
    }
}

/// `promtool check metrics` from Debian's prometheus package; CI installs it.
fn promtool_accepts(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var("CI").is_err(),
            "promtool is required in CI (apt-get install prometheus)"
        );
        eprintln!("promtool not installed: skipping the lint of the exposition format");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "promtool: {problems}\n{text}"
    );
}

#[test]
fn dashboard_queries_only_metrics_the_binaries_export() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let peer = daemon(tracker.addr, dir.path(), "p", &[]);
    let exported = format!("{}\n{}", tracker.metrics_text(), peer.metrics_text());
    let families: Vec<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();

    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/k8s/dashboard/shoal.json"
    ))
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 6, "the dashboard should have queries");
    let mut used = 0;
    for expr in &exprs {
        for name in metric_names(expr) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| families.contains(f))
                .unwrap_or(&name);
            assert!(
                families.contains(&family),
                "dashboard query uses {name}, which no binary exports: {expr}"
            );
            used += 1;
        }
    }
    assert!(used >= exprs.len());
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v.as_str() {
                    Some(s) if k == "expr" => out.push(s.to_string()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Identifiers in a PromQL expression that look like Shoal metric names.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("shoal_"))
        .map(String::from)
        .collect()
}
