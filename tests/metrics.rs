//! Metrics tell the truth: counters equal what really moved, every endpoint passes
//! `promtool check metrics`, the series alerts watch exist from the start, the endpoints only
//! read, and the dashboard only queries metrics the binaries export.

mod common;
use common::*;
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
        .metric("shoal_peer_uploaded_chunks_total")
        == chunks));
    assert_eq!(
        seeder.metric("shoal_peer_uploaded_bytes_total"),
        1_500_000.0
    );
    assert_eq!(d.metric("shoal_peer_downloaded_chunks_total"), chunks);
    assert_eq!(d.metric("shoal_peer_downloaded_bytes_total"), 1_500_000.0);
    assert_eq!(d.metric("shoal_peer_duplicate_chunks_total"), 0.0);
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
        assert_eq!(p.metric("shoal_peer_downloaded_bytes_total"), total_bytes);
        assert_eq!(p.metric("shoal_peer_downloaded_chunks_total"), total_chunks);
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
        sum("shoal_peer_downloaded_chunks_total") + sum("shoal_peer_duplicate_chunks_total");
    assert_eq!(
        sum("shoal_peer_downloaded_chunks_total"),
        3.0 * total_chunks
    );
    let ok = wait_until(Duration::from_secs(5), || {
        let sent = sum("shoal_peer_uploaded_chunks_total");
        sent >= received && sent <= received + 2.0 * 3.0
    });
    assert!(
        ok,
        "sent {} received {received}",
        sum("shoal_peer_uploaded_chunks_total")
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

#[test]
fn fresh_processes_export_build_info_process_metrics_and_zero_series() {
    let tracker = tracker(&[]);
    let before_any_peer = tracker.metrics_text();
    let dir = tempfile::tempdir().unwrap();
    let peer = daemon(tracker.addr, dir.path(), "p", &[]);
    let peer_text = peer.metrics_text();

    for text in [&before_any_peer, &peer_text] {
        let (version, revision) = build_info(text);
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert!(
            !revision.is_empty(),
            "shoal_build_info has an empty revision"
        );
        if let Some(head) = git_short_head() {
            assert_eq!(revision, head, "shoal_build_info names another commit");
        }
        for name in [
            "process_start_time_seconds",
            "process_resident_memory_bytes",
        ] {
            let value = metric_value(text, name).unwrap_or(0.0);
            assert!(value > 0.0, "{name} is {value}, expected a positive value");
        }
        assert!(metric_value(text, "process_open_fds").is_some());
        promtool_accepts(text);
    }
    // A rule such as `increase(x{reason="busy"}[5m]) > 0` sees nothing rise from a missing series.
    for msg in [
        "register",
        "locations",
        "chunk_register",
        "leave",
        "announce",
        "withdraw",
        "invalid",
    ] {
        for outcome in ["ok", "error"] {
            let sample =
                format!("shoal_tracker_requests_total{{msg=\"{msg}\",outcome=\"{outcome}\"}}");
            assert_eq!(
                metric_value(&before_any_peer, &sample),
                Some(0.0),
                "{sample}"
            );
        }
    }
    let refused = shoal::protocol::ErrorCode::ALL.map(|c| {
        format!(
            "shoal_peer_chunk_requests_refused_total{{reason=\"{}\"}}",
            c.as_str()
        )
    });
    let banned = ["corrupt_chunk", "wrong_header"]
        .map(|r| format!("shoal_peer_holders_banned_total{{reason=\"{r}\"}}"));
    for sample in refused.iter().chain(&banned) {
        assert_eq!(metric_value(&peer_text, sample), Some(0.0), "{sample}");
    }
    for name in [
        "shoal_peer_downloaded_bytes_total",
        "shoal_peer_uploaded_bytes_total",
        "shoal_peer_downloaded_chunks_total",
        "shoal_peer_uploaded_chunks_total",
        "shoal_peer_duplicate_chunks_total",
    ] {
        assert_eq!(metric_value(&peer_text, name), Some(0.0), "{name}");
    }
}

/// The labels of `shoal_build_info`, which must be 1: (version, revision).
fn build_info(text: &str) -> (String, String) {
    let line = text
        .lines()
        .find(|l| l.starts_with("shoal_build_info{"))
        .expect("shoal_build_info is exported");
    assert!(line.ends_with("} 1"), "shoal_build_info is not 1: {line}");
    let label = |name: &str| {
        let start = line.find(&format!("{name}=\"")).expect("label present") + name.len() + 2;
        line[start..].split('"').next().unwrap().to_string()
    };
    (label("version"), label("revision"))
}

/// The commit the tests were built from, when they run in a git checkout.
fn git_short_head() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let head = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !head.is_empty()).then_some(head)
}

#[test]
fn http_endpoints_answer_only_get_and_head() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let peer = daemon(tracker.addr, dir.path(), "p", &[]);
    for addr in [tracker.metrics.unwrap(), peer.metrics.unwrap()] {
        for (method, path) in [
            ("POST", "/metrics"),
            ("PUT", "/healthz"),
            ("DELETE", "/readyz"),
        ] {
            let (status, head, _) = http_request(addr, method, path);
            assert_eq!(status, 405, "{method} {path}");
            let allow = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("allow:")
                    .map(str::trim)
                    .map(String::from)
            });
            assert_eq!(
                allow.as_deref(),
                Some("get, head"),
                "{method} {path}: {head}"
            );
        }
        let (status, _, body) = http_request(addr, "HEAD", "/metrics");
        assert_eq!((status, body.as_str()), (200, ""), "HEAD /metrics");
        assert_eq!(http_get(addr, "/metrics").0, 200);
    }
}

/// `promtool check metrics` finds nothing to say about the exposition.
fn promtool_accepts(text: &str) {
    if let Some((ok, printed)) = promtool(&["check", "metrics"], text) {
        assert!(
            ok && printed.trim().is_empty(),
            "promtool: {printed}\n{text}"
        );
    }
}

#[test]
fn dashboard_and_alerts_query_only_metrics_the_binaries_export() {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let peer = daemon(tracker.addr, dir.path(), "p", &[]);
    // The duration histogram has series (and so a family) once a request has been timed.
    let timed = "shoal_tracker_request_duration_seconds_count{msg=\"register\"}";
    assert!(wait_until(Duration::from_secs(5), || tracker
        .metrics_text()
        .contains(timed)));
    let exported = format!("{}\n{}", tracker.metrics_text(), peer.metrics_text());
    let families: Vec<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();

    let read = |path: &str| {
        std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&read("k8s/dashboard/shoal.json")).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 6, "the dashboard should have queries");
    // The rules file as a whole: expressions and the metrics their descriptions point to.
    exprs.push(read("docker/alerts.yml"));
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
                "dashboard or alert query uses {name}, which no binary exports: {expr}"
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

/// Identifiers in a PromQL expression that look like names of metrics Shoal exports.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("shoal_") || w.starts_with("process_"))
        .map(String::from)
        .collect()
}
