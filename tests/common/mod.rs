//! Test harness: starts the real binaries on 127.0.0.1 port 0, learns their real addresses from
//! the JSON start-up log line, and offers small raw clients and condition waits. Nothing here
//! sleeps to synchronise: every wait polls a condition with a deadline.
#![allow(dead_code)] // each test file uses a different subset

pub mod origin;
pub mod registry;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TRACKER: &str = env!("CARGO_BIN_EXE_shoal-tracker");
pub const PEER: &str = env!("CARGO_BIN_EXE_shoal-peer");

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running binary; killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    /// The HTTP API's address, for a peer started with `SHOAL_API_ADDR`.
    pub api: Option<SocketAddr>,
}

impl Proc {
    /// Spawns `cmd` with JSON logs (at `info` unless it sets `SHOAL_LOG`) and waits for the
    /// log line `ready_message`.
    pub fn spawn(mut cmd: Command, ready_message: &str) -> Proc {
        cmd.env("SHOAL_LOG_FORMAT", "json").stderr(Stdio::piped());
        if cmd.get_envs().all(|(k, _)| k != "SHOAL_LOG") {
            cmd.env("SHOAL_LOG", "info");
        }
        if cmd.get_envs().all(|(k, _)| k != "SHOAL_CONFIG") {
            cmd.env_remove("SHOAL_CONFIG");
        }
        let mut child = cmd.spawn().expect("binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut found = None;
        let started = wait_until(Duration::from_secs(20), || {
            found = find_log(&log, ready_message);
            found.is_some() || matches!(child.try_wait(), Ok(Some(_)))
        });
        let Some(line) = found.filter(|_| started) else {
            let _ = child.kill();
            panic!(
                "no {ready_message:?} log line; log:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        let addr = line["addr"]
            .as_str()
            .expect("addr field")
            .parse()
            .expect("socket addr");
        let metrics = line["metrics"].as_str().and_then(|m| m.parse().ok());
        let api = line["api"].as_str().and_then(|m| m.parse().ok());
        Proc {
            child,
            log,
            addr,
            metrics,
            api,
        }
    }

    pub fn log_contains(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for exit (bounded); `None` if still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(limit, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// The value of one metric sample (`name` or `name{labels}` exactly as exported).
    pub fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics_text(), sample)
            .unwrap_or_else(|| panic!("metric {sample} not exported"))
    }

    pub fn metrics_text(&self) -> String {
        http_get(self.metrics.expect("metrics enabled"), "/metrics").1
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_log(log: &Mutex<Vec<String>>, message: &str) -> Option<Value> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"].as_str() == Some(message))
}

pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A GET: (status, body as text).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, "GET", path);
    (status, body)
}

/// A request without a body: (status, header lines, body as text).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let reply = http(addr, method, path, &[]);
    let head: Vec<String> = reply
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let body = String::from_utf8_lossy(&reply.body).into_owned();
    (reply.status, head.join("\r\n"), body)
}

/// An HTTP/1.1 response read from a raw socket, body as bytes.
pub struct HttpReply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// How reading the body ended: `None` at a clean end of the connection.
    pub error: Option<std::io::Error>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// An HTTP/1.1 exchange on one connection (`Connection: close`) whose body can be read bit by
/// bit, to see bytes arrive before the whole body has.
pub struct HttpStream {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl HttpStream {
    /// Sends `method path` with `headers` and reads the status line and headers.
    pub fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> HttpStream {
        let mut s = TcpStream::connect(addr).expect("API reachable");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        for (k, v) in headers {
            req += &format!("{k}: {v}\r\n");
        }
        s.write_all(format!("{req}\r\n").as_bytes()).unwrap();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').expect("header line");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        HttpStream {
            reader,
            status,
            headers,
        }
    }

    /// Reads exactly `n` body bytes.
    pub fn read_exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; n];
        self.reader.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Reads the rest of the body until the connection ends, cleanly or not.
    pub fn finish(mut self, mut body: Vec<u8>) -> HttpReply {
        let mut error = None;
        let mut buf = vec![0; 1 << 16];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        HttpReply {
            status: self.status,
            headers: self.headers,
            body,
            error,
        }
    }
}

/// One whole HTTP/1.1 exchange.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpReply {
    HttpStream::open(addr, method, path, headers).finish(Vec::new())
}

/// Runs `promtool` (Debian's `prometheus` package) with `args` from the repository root, feeding
/// it `stdin`: (it succeeded, what it printed). None when promtool is not installed, which is an
/// error in CI (`CI` set): there a missing tool must fail the check, not skip it.
pub fn promtool(args: &[&str], stdin: &str) -> Option<(bool, String)> {
    let Ok(mut child) = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var("CI").is_err(),
            "promtool is required in CI: apt-get install prometheus"
        );
        eprintln!(
            "promtool not installed: skipping promtool {}",
            args.join(" ")
        );
        return None;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), printed))
}

/// Starts a tracker on an ephemeral port with metrics, with extra `SHOAL_*` settings.
pub fn tracker(env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(TRACKER);
    cmd.env("SHOAL_LISTEN", "127.0.0.1:0")
        .env("SHOAL_METRICS_ADDR", "127.0.0.1:0")
        .env("SHOAL_ANNOUNCE_INTERVAL", "1s");
    cmd.envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Proc::spawn(cmd, "tracker listening")
}

/// Starts a tracker on a given address (to restart one in place).
pub fn tracker_at(addr: SocketAddr, env: &[(&str, &str)]) -> Proc {
    let listen = addr.to_string();
    let mut all = vec![("SHOAL_LISTEN", listen.as_str())];
    all.extend_from_slice(env);
    let mut cmd = Command::new(TRACKER);
    cmd.env("SHOAL_METRICS_ADDR", "127.0.0.1:0")
        .env("SHOAL_ANNOUNCE_INTERVAL", "1s");
    cmd.envs(all.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Proc::spawn(cmd, "tracker listening")
}

/// Settings every test peer gets: quick refreshes and short timeouts keep the suite fast.
pub const FAST: &[(&str, &str)] = &[
    ("SHOAL_CHUNK_SIZE", "65536"),
    ("SHOAL_REFRESH_INTERVAL", "200ms"),
    ("SHOAL_CHUNK_TIMEOUT", "2s"),
    ("SHOAL_CONNECT_TIMEOUT", "1s"),
    ("SHOAL_REQUEST_TIMEOUT", "2s"),
];

/// Starts `shoal-peer run` (daemon) sharing `dir`, configured by environment only.
pub fn daemon(tracker: SocketAddr, dir: &Path, name: &str, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(PEER);
    cmd.arg("run");
    daemon_env(&mut cmd, tracker, dir, name, env);
    Proc::spawn(cmd, "peer listening")
}

/// The environment of a test daemon peer, for commands that wrap the binary: [`FAST`]
/// settings, then `env`.
pub fn daemon_env(
    cmd: &mut Command,
    tracker: SocketAddr,
    dir: &Path,
    name: &str,
    env: &[(&str, &str)],
) {
    let all: Vec<(&str, &str)> = FAST.iter().chain(env).copied().collect();
    placed_peer(cmd, tracker, dir, name, &all);
}

/// Where a daemon peer finds its tracker, listens and keeps its files, plus `env`; nothing
/// else, so every other setting keeps its real default (benchmarks use this).
pub fn placed_peer(
    cmd: &mut Command,
    tracker: SocketAddr,
    dir: &Path,
    name: &str,
    env: &[(&str, &str)],
) {
    cmd.env("SHOAL_TRACKER", tracker.to_string())
        .env("SHOAL_LISTEN", "127.0.0.1:0")
        .env("SHOAL_METRICS_ADDR", "127.0.0.1:0")
        .env("SHOAL_DATA_DIR", dir)
        .env("SHOAL_NAME", name)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
}

/// Runs the one-shot `shoal-peer get NAME` against `tracker` with [`FAST`] settings, landing the
/// file in `dir`, and returns how it ended.
pub fn get_once(tracker: SocketAddr, name: &str, dir: &Path) -> std::process::Output {
    get_with(tracker, name, dir, &[])
}

/// [`get_once`] with extra `SHOAL_*` settings after the [`FAST`] ones.
pub fn get_with(
    tracker: SocketAddr,
    name: &str,
    dir: &Path,
    env: &[(&str, &str)],
) -> std::process::Output {
    Command::new(PEER)
        .args(["get", name, "--tracker", &tracker.to_string()])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .envs(FAST.iter().chain(env).copied())
        .output()
        .unwrap()
}

/// The digest `shoal-peer files --json` lists for `name`.
pub fn listed_digest(tracker: SocketAddr, name: &str) -> String {
    let out = Command::new(PEER)
        .args(["files", "--json", "--tracker", &tracker.to_string()])
        .output()
        .unwrap();
    let files: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let entry = files.iter().find(|f| f["name"] == name).expect("listed");
    entry["digest"].as_str().unwrap().to_string()
}

/// Writes `len` bytes of deterministic pseudo-random content (varying with `seed`).
pub fn make_file(dir: &Path, name: &str, len: usize, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// Whether `path` exists and has exactly the bytes of `original`.
pub fn same_bytes(original: &Path, path: &Path) -> bool {
    match (std::fs::read(original), std::fs::read(path)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Waits (up to 60 s) until `path` holds exactly the bytes of `original`; fails showing the log
/// of `downloader`.
pub fn assert_lands(original: &Path, path: &Path, downloader: &Proc) {
    assert!(
        wait_until(Duration::from_secs(60), || same_bytes(original, path)),
        "{}",
        downloader.log_text()
    );
}

/// A raw line-protocol client for hostile and protocol-level tests.
pub struct Raw {
    reader: BufReader<TcpStream>,
    pub stream: TcpStream,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    pub fn send(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    /// The next reply line as JSON; `None` on close.
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}")),
            ),
        }
    }

    pub fn ask(&mut self, line: &str) -> Value {
        self.send(line);
        self.recv().expect("a reply")
    }

    /// Reads exactly `len` raw bytes (a chunk body).
    pub fn recv_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.reader.read_exact(&mut buf).unwrap();
        buf
    }

    /// Whether the server accepted this connection and stays quiet (no `busy` line) for 200 ms.
    pub fn recv_timeout_is_silent(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 1];
        let silent = matches!(self.reader.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut);
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        silent
    }

    /// Whether the other side closed the connection (reads EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0) | Err(_))
    }
}

/// Registers a fake peer at `addr` claiming every chunk of the file described by a locations
/// reply (with hashes); returns (peer_id, token).
pub fn register_fake_holder(tracker: SocketAddr, addr: &str, loc: &Value) -> (u64, String) {
    let file = &loc["file"];
    let req = serde_json::json!({
        "v": 1, "msg": 1, "name": "fake", "addr": addr,
        "files": [{
            "name": file["name"], "size": file["size"], "chunk_size": file["chunk_size"],
            "digest": file["digest"], "hashes": loc["hashes"],
        }],
    });
    let reply = Raw::connect(tracker).ask(&req.to_string());
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["files"][0]["accepted"], true, "{reply}");
    (
        reply["peer_id"].as_u64().unwrap(),
        reply["token"].as_str().unwrap().to_string(),
    )
}

/// A registration offer for a local file, as message 1 would carry it.
pub fn offer_for(path: &Path, chunk_size: u32) -> Value {
    let name = path.file_name().unwrap().to_str().unwrap();
    let (info, hashes) = shoal::chunking::hash_file(path, name, Some(chunk_size)).unwrap();
    serde_json::to_value(shoal::protocol::FileOffer {
        info,
        published: 0,
        hashes,
        have: None,
    })
    .unwrap()
}

/// Message 3 with hashes, as JSON.
pub fn locations(tracker: SocketAddr, file: &str) -> Value {
    let reply = Raw::connect(tracker).ask(&format!(
        r#"{{"v":1,"msg":3,"file":"{file}","hashes":true}}"#
    ));
    assert_eq!(reply["ok"], true, "{reply}");
    reply
}

/// Holders of `file` the tracker currently lists.
pub fn holder_count(tracker: SocketAddr, file: &str) -> u64 {
    let reply = Raw::connect(tracker).ask(&format!(r#"{{"v":1,"msg":3,"file":"{file}"}}"#));
    reply["total_peers"].as_u64().unwrap_or(0)
}

/// Names in the tracker's file list.
pub fn file_names(tracker: SocketAddr) -> Vec<String> {
    let Ok(stream) = TcpStream::connect(tracker) else {
        return Vec::new();
    };
    drop(stream);
    let reply = Raw::connect(tracker).ask(r#"{"v":1,"msg":2}"#);
    reply["files"]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|x| x["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the seed's menu form `shoal-peer <tracker_port> 0 <name> [files]` in `dir`, feeding
/// `input` on stdin; returns (exit status, stdout). Killed after `limit`.
pub fn run_menu(
    tracker: SocketAddr,
    dir: &Path,
    name: &str,
    files: &[&Path],
    input: &str,
    limit: Duration,
) -> (ExitStatus, String) {
    let mut cmd = Command::new(PEER);
    cmd.arg(tracker.port().to_string())
        .arg("0")
        .arg(name)
        .args(files);
    cmd.current_dir(dir)
        .envs(FAST.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("menu starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut status = None;
    wait_until(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("menu did not exit within {limit:?}; output so far is lost");
    });
    (status, reader.join().unwrap())
}

/// A hostile holder in the test process: answers chunk requests as `behaviour` says.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// Correct headers, wrong bytes.
    Lies,
    /// Reads requests, never answers.
    Stalls,
}

pub struct FakeHolder {
    pub addr: SocketAddr,
    pub connections: Arc<Mutex<usize>>,
}

pub fn fake_holder(behaviour: Hostile, loc: &Value) -> FakeHolder {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(Mutex::new(0));
    let count = connections.clone();
    let size = loc["file"]["size"].as_u64().unwrap();
    let chunk = loc["file"]["chunk_size"].as_u64().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            *count.lock().unwrap() += 1;
            std::thread::spawn(move || serve_hostile(stream, behaviour, size, chunk));
        }
    });
    FakeHolder { addr, connections }
}

fn serve_hostile(stream: TcpStream, behaviour: Hostile, size: u64, chunk: u64) {
    let mut writer = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        if behaviour == Hostile::Stalls {
            continue;
        }
        let req: Value = serde_json::from_str(&line).unwrap();
        let index = req["index"].as_u64().unwrap();
        let len = chunk.min(size - index * chunk);
        let header = serde_json::json!({
            "v": 1, "msg": 5, "ok": true, "file": req["file"], "index": index, "length": len, "hash": "00".repeat(32),
        });
        if writeln!(writer, "{header}").is_err()
            || writer.write_all(&vec![0xAB; len as usize]).is_err()
        {
            return;
        }
    }
}

/// A tracker and one daemon seeding `name` (`len` bytes, content from `seed`) from `dir/s`,
/// with extra `env` for the seeder; returns once the tracker lists the seeder as its holder.
pub fn seeded(
    name: &str,
    len: usize,
    seed: u64,
    env: &[(&str, &str)],
) -> (Proc, Proc, tempfile::TempDir, PathBuf) {
    let tracker = tracker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), name, len, seed);
    let seeder = daemon(tracker.addr, &dir.path().join("s"), "s", env);
    assert!(wait_until(Duration::from_secs(10), || holder_count(
        tracker.addr,
        name
    ) == 1));
    (tracker, seeder, dir, original)
}

/// `n` trackers on ephemeral ports, with extra `SHOAL_*` settings.
pub fn trackers(n: usize, env: &[(&str, &str)]) -> Vec<Proc> {
    (0..n).map(|_| tracker(env)).collect()
}

/// The `SHOAL_TRACKER` value naming every one of `trackers`.
pub fn tracker_list(trackers: &[Proc]) -> String {
    let addrs: Vec<String> = trackers.iter().map(|t| t.addr.to_string()).collect();
    addrs.join(",")
}

/// The indices of `trackers` that own file `name` with `replicas` owners each (the peers'
/// rendezvous order over the listed addresses), when all are up.
pub fn owners_of(trackers: &[Proc], name: &str, replicas: usize) -> Vec<usize> {
    let addrs: Vec<String> = trackers.iter().map(|t| t.addr.to_string()).collect();
    let keys: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut order = shoal::peer::trackers::rendezvous(&keys, name);
    order.truncate(replicas);
    order
}

/// Throwaway certificates for TLS tests and benchmarks, written into a temporary directory: a CA,
/// a tracker certificate for 127.0.0.1, and peer certificates `p0`.. carrying `shoal-peer`.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub ca: shoal::tls::certs::Authority,
}

impl Certs {
    pub fn new(peers: usize) -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let ca = shoal::tls::certs::Authority::new("test CA").unwrap();
        shoal::tls::certs::write(&dir.path().join("ca.pem"), ca.pem(), 0o644).unwrap();
        let certs = Certs { dir, ca };
        certs.issue("tracker", &["127.0.0.1", "localhost"]);
        for i in 0..peers {
            certs.issue(&format!("p{i}"), &["shoal-peer", &format!("p{i}")]);
        }
        certs
    }

    /// Issues (or replaces) `STEM.pem` and `STEM.key` for `names`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> shoal::tls::certs::Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let issued = self.ca.issue(&names).unwrap();
        issued.write(self.dir.path(), stem).unwrap();
        issued
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_str().unwrap().to_string()
    }

    /// The `SHOAL_TLS_*` settings for the holder of `STEM.pem`.
    pub fn env(&self, stem: &str) -> Vec<(&'static str, String)> {
        vec![
            ("SHOAL_TLS_CERT", self.path(&format!("{stem}.pem"))),
            ("SHOAL_TLS_KEY", self.path(&format!("{stem}.key"))),
            ("SHOAL_TLS_CA", self.path("ca.pem")),
        ]
    }
}

/// `pairs` as the `(&str, &str)` pairs the starters take.
pub fn env_refs<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A blocking TLS client as any rustls program would make it: trusting `ca`, showing the
/// certificate `stem` (if any) of `certs`' directory.
pub fn tls_client(ca: &str, identity: Option<(&Certs, &str)>, addr: SocketAddr) -> TlsStream {
    tls_client_for(ca, identity, addr, "127.0.0.1")
}

/// [`tls_client`] checking that the server's certificate carries `name` (a peer's chunk server
/// carries `shoal-peer`, not its ip).
pub fn tls_client_for(
    ca: &str,
    identity: Option<(&Certs, &str)>,
    addr: SocketAddr,
    name: &str,
) -> TlsStream {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((certs, stem)) => {
            let chain = CertificateDer::pem_file_iter(certs.path(&format!("{stem}.pem")))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(certs.path(&format!("{stem}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Sends one request line and reads one reply line; `Err` carries the I/O error (a refusal in
/// the handshake shows up here, on the first read, in TLS 1.3).
pub fn tls_ask(stream: &mut TlsStream, line: &str) -> Result<Value, String> {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .and_then(|_| stream.flush())
        .map_err(|e| e.to_string())?;
    tls_recv(stream)
}

/// Reads one line (the handshake first, if it is not done); `Err` on close or an I/O error.
pub fn tls_recv(stream: &mut TlsStream) -> Result<Value, String> {
    let mut reply = String::new();
    let mut reader = BufReader::new(stream);
    match reader.read_line(&mut reply) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(serde_json::from_str(&reply).unwrap()),
        Err(e) => Err(e.to_string()),
    }
}

/// Holders of `file` the tracker currently lists, asked in the tracker's mode: clear text, or TLS
/// with certificate `p0` of `certs`.
pub fn holder_count_in(tracker: SocketAddr, file: &str, certs: Option<&Certs>) -> u64 {
    let Some(certs) = certs else {
        return holder_count(tracker, file);
    };
    let mut client = tls_client(&certs.path("ca.pem"), Some((certs, "p0")), tracker);
    let reply = tls_ask(
        &mut client,
        &format!(r#"{{"v":1,"msg":3,"file":"{file}"}}"#),
    );
    reply.map_or(0, |r| r["total_peers"].as_u64().unwrap_or(0))
}
