//! `shoal-peer fetch`, the node agent's client: against a real agent it lands the file the agent
//! is still downloading, pins versions and fails cleanly when the download dies; the file appears
//! under its name only when every announced byte arrived, and each failure has its exit code. A
//! scripted fake agent plays the faults a real one does not commit (a body that ends short
//! without an error, no Content-Length).

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

/// A one-shot HTTP server: answers the first request with `response` (raw bytes, then closes)
/// and hands back the request line it got.
fn fake_agent(response: Vec<u8>) -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        for _ in 0..100 {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
        }
        let _ = tx.send(request_line.trim_end().to_string());
        let mut stream = stream;
        let _ = stream.write_all(&response);
    });
    (addr, rx)
}

fn ok_head(len: usize) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n").into_bytes()
}

fn fetch(agent: &str, name: &str, output: &Path, extra: &[&str]) -> Output {
    Command::new(PEER)
        .args(["fetch", name, "--agent", agent, "--output"])
        .arg(output)
        .args(extra)
        .args(["--idle-timeout", "10s"])
        .output()
        .expect("shoal-peer runs")
}

/// Every entry of `dir`, hidden ones included, so a leftover temp file shows.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn fetch_writes_the_whole_file_and_replaces_an_older_one() {
    let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut response = ok_head(body.len());
    response.extend_from_slice(&body);
    let (addr, requests) = fake_agent(response);
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("model.bin");
    std::fs::write(&output, b"the old version").unwrap();
    let digest = "ab".repeat(32);

    let out = fetch(
        &format!("http://{addr}"),
        "models/a b.bin",
        &output,
        &["--digest", &digest],
    );

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&output).unwrap(), body);
    assert_eq!(entries(dir.path()), ["model.bin"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        output.display().to_string()
    );
    let request = requests.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        request,
        format!("GET /v1/files/models/a%20b.bin?digest={digest} HTTP/1.1")
    );
}

#[test]
fn a_short_body_fails_and_leaves_no_file_behind() {
    let mut response = ok_head(1000);
    response.extend_from_slice(&[7u8; 600]);
    let (addr, _requests) = fake_agent(response);
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("a.bin");

    let out = fetch(&format!("http://{addr}"), "a.bin", &output, &[]);

    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("600 of 1000 bytes"), "{stderr}");
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

#[test]
fn an_answer_without_content_length_is_refused() {
    let response = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nsome bytes".to_vec();
    let (addr, _requests) = fake_agent(response);
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("a.bin");

    let out = fetch(&format!("http://{addr}"), "a.bin", &output, &[]);

    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Content-Length"));
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn an_unknown_name_exits_4_with_the_agents_reason() {
    let body = r#"{"error":"no file \"nope.bin\" in the swarm"}"#;
    let response = format!(
        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (addr, _requests) = fake_agent(response.into_bytes());
    let dir = tempfile::tempdir().unwrap();

    let out = fetch(
        &format!("http://{addr}"),
        "nope.bin",
        &dir.path().join("x"),
        &[],
    );

    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"no file "nope.bin" in the swarm"#),
        "{stderr}"
    );
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn usage_errors_exit_2_and_an_absent_agent_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("x");
    // A port nothing listens on: bind one, learn it, close it.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    let unreachable = fetch(&format!("http://{closed}"), "a.bin", &output, &[]);
    let bad_name = fetch(&format!("http://{closed}"), "../a.bin", &output, &[]);
    let bad_url = fetch(&closed.to_string(), "a.bin", &output, &[]);
    let bad_digest = fetch(
        &format!("http://{closed}"),
        "a.bin",
        &output,
        &["--digest", "x"],
    );

    assert_eq!(unreachable.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("unreachable"));
    for out in [&bad_name, &bad_url, &bad_digest] {
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(entries(dir.path()).is_empty());
}

const MIB: usize = 1 << 20;

/// A tracker, a seeder of `name` capped at `limit` bytes/s, and an agent with its API on; the
/// agent's data dir is `dir/a`.
fn swarm_with_agent(
    name: &str,
    size: usize,
    limit: &str,
) -> (Proc, Proc, Proc, tempfile::TempDir, std::path::PathBuf) {
    let (tracker, seeder, dir, original) = seeded(name, size, 41, &[("SHOAL_UPLOAD_LIMIT", limit)]);
    let agent = daemon(
        tracker.addr,
        &dir.path().join("a"),
        "agent",
        &[("SHOAL_API_ADDR", "127.0.0.1:0")],
    );
    (tracker, seeder, agent, dir, original)
}

#[test]
fn fetch_through_a_real_agent_lands_the_pinned_file_it_is_still_downloading() {
    let (tracker, _seeder, agent, dir, original) = swarm_with_agent("m.bin", 3 * MIB, "2MiB");
    let digest = listed_digest(tracker.addr, "m.bin");
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("m.bin");

    let out = fetch(
        &format!("http://{}", agent.api.unwrap()),
        "m.bin",
        &output,
        &["--digest", &digest],
    );

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(same_bytes(&original, &output));
    assert_eq!(entries(out_dir.path()), ["m.bin"]);
    // The agent kept its own copy for the node's next reader and for the swarm.
    assert_lands(&original, &dir.path().join("a/m.bin"), &agent);
}

#[test]
fn fetch_of_a_name_the_swarm_lacks_exits_4_at_once() {
    let (_tracker, _seeder, agent, _dir, _original) = swarm_with_agent("m.bin", 64 * 1024, "0");
    let out_dir = tempfile::tempdir().unwrap();

    let out = fetch(
        &format!("http://{}", agent.api.unwrap()),
        "nope.bin",
        &out_dir.path().join("nope.bin"),
        &[],
    );

    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(entries(out_dir.path()).is_empty());
}

#[test]
fn fetch_fails_and_leaves_nothing_when_the_agents_download_dies() {
    let (_tracker, mut seeder, agent, _dir, _original) =
        swarm_with_agent("gone.bin", 16 * MIB, "2MiB");
    let out_dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(PEER)
        .args(["fetch", "gone.bin", "--agent"])
        .arg(format!("http://{}", agent.api.unwrap()))
        .arg("--output")
        .arg(out_dir.path().join("gone.bin"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bytes are arriving in the hidden temp file beside the output.
    let temp_grows = || {
        std::fs::read_dir(out_dir.path()).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name().to_string_lossy().ends_with(".shoal-fetch")
                && e.metadata().unwrap().len() >= MIB as u64
        })
    };
    assert!(wait_until(Duration::from_secs(30), temp_grows));

    seeder.kill9();

    let mut status = None;
    assert!(wait_until(Duration::from_secs(60), || {
        status = child.try_wait().unwrap();
        status.is_some()
    }));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.unwrap().code(), Some(1), "{stderr}");
    assert!(stderr.contains("of 16777216 bytes"), "{stderr}");
    assert!(
        entries(out_dir.path()).is_empty(),
        "{:?}",
        entries(out_dir.path())
    );
}
