//! BitTorrent beside Shoal: Debian's opentracker and one aria2c seeder plus N aria2c leechers
//! on the same file, caps and machine, in the same [`Place`]. DHT, local peer discovery and peer
//! exchange are off, so peers meet through the tracker only, as Shoal's do.

use crate::netns::{Place, Spot};
use crate::swarm::{Plan, Run};
use crate::{cpu_of, digest_of};
use anyhow::{bail, Context};
use sha1::{Digest, Sha1};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the BitTorrent side is not run (`shoal-only`, or it cannot be installed here); `None`
/// if it runs.
pub fn unavailable() -> Option<String> {
    if crate::options().shoal_only {
        return Some("left out (`shoal-only`)".into());
    }
    let missing = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
    };
    let installable = crate::is_root() && !missing("apt-get");
    if (missing("opentracker") || missing("aria2c")) && installable {
        println!("  installing opentracker and aria2 with apt-get");
        for args in [
            &["update", "-q"][..],
            &["install", "-y", "-q", "opentracker", "aria2"],
        ] {
            let _ = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status();
        }
    }
    let absent: Vec<&str> = ["opentracker", "aria2c"]
        .into_iter()
        .filter(|t| missing(t))
        .collect();
    (!absent.is_empty()).then(|| {
        format!(
            "{} not installed and apt-get could not install it (Debian: apt-get install opentracker aria2)",
            absent.join(" and ")
        )
    })
}

/// A child process killed when dropped.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Distributes `original` (cut in pieces of `piece` bytes) as `plan` says; returns when every
/// copy is complete and verified.
pub fn distribute(
    plan: &Plan,
    place: &Place,
    dir: &Path,
    original: &Path,
    digest: &str,
    piece: u64,
) -> anyhow::Result<Run> {
    let name = original
        .file_name()
        .and_then(|n| n.to_str())
        .context("file name")?;
    let tracker_port = free_port(place, Spot::Hub)?;
    let announce = format!("http://{}:{tracker_port}/announce", place.ip(Spot::Hub));
    let (torrent, info_hash) = make_torrent(original, name, piece, &announce)?;
    std::fs::create_dir_all(dir)?;
    let torrent_path = dir.join("swarm.torrent");
    std::fs::write(&torrent_path, torrent)?;
    let hook = dir.join("complete.sh");
    std::fs::write(&hook, HOOK)?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let whitelist = dir.join("whitelist");
    std::fs::write(&whitelist, format!("{info_hash}\n"))?;
    let tracker = Guarded(
        place
            .command(Spot::Hub, "opentracker")
            .arg("-i")
            .arg(place.ip(Spot::Hub).to_string())
            .args(["-p", &tracker_port.to_string(), "-w"])
            .arg(&whitelist)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start opentracker")?,
    );
    let tracker_addr = SocketAddr::new(place.ip(Spot::Hub), tracker_port);
    if !crate::common::wait_until(Duration::from_secs(10), || {
        place.run(Spot::Hub, || TcpStream::connect(tracker_addr).is_ok())
    }) {
        bail!("opentracker did not listen on {tracker_addr}");
    }

    let seed_dir = dir.join("seeder");
    std::fs::create_dir_all(&seed_dir)?;
    std::fs::hard_link(original, seed_dir.join(name))?;
    let rpc_port = free_port(place, Spot::Peer(0))?;
    let mut seeder = aria2c(place, plan, 0, &seed_dir, &torrent_path, &hook)?;
    seeder.args([
        "--bt-seed-unverified=true",
        "--enable-rpc=true",
        &format!("--rpc-listen-port={rpc_port}"),
    ]);
    let seeder = Guarded(seeder.spawn().context("cannot start aria2c")?);
    // aria2c answers RPC on the 127.0.0.1 of its place.
    let rpc = SocketAddr::from(([127, 0, 0, 1], rpc_port));
    if !crate::common::wait_until(Duration::from_secs(10), || {
        place.run(Spot::Peer(0), || uploaded(rpc).is_ok())
    }) {
        bail!("the aria2c seeder did not start");
    }

    let dirs: Vec<PathBuf> = (1..=plan.n).map(|i| dir.join(format!("peer{i}"))).collect();
    let copies: Vec<PathBuf> = dirs.iter().map(|d| d.join(name)).collect();
    let started = Instant::now();
    let mut leechers = Vec::new();
    let mut joins = Vec::new();
    let mut done: Vec<Option<Duration>> = vec![None; plan.n];
    let limit = plan.wait_limit();
    let complete = crate::common::wait_until(limit, || {
        while leechers.len() < plan.n && started.elapsed() >= plan.joins[leechers.len()] {
            let i = leechers.len() + 1;
            let spawned = aria2c(place, plan, i, &dirs[i - 1], &torrent_path, &hook)
                .and_then(|mut c| Ok(c.spawn()?));
            match spawned {
                Ok(child) => {
                    joins.push(started.elapsed());
                    leechers.push(Guarded(child));
                }
                Err(e) => panic!("cannot start aria2c leecher {i}: {e:#}"),
            }
        }
        for (copy, d) in copies.iter().zip(done.iter_mut()).take(leechers.len()) {
            if d.is_none() && done_mark(copy).exists() {
                *d = Some(started.elapsed());
            }
        }
        leechers.len() == plan.n && done.iter().all(Option::is_some)
    });
    if !complete {
        let incomplete: Vec<String> = done
            .iter()
            .zip(leechers.iter_mut())
            .enumerate()
            .filter(|(_, (d, _))| d.is_none())
            .map(|(i, (_, leecher))| match leecher.0.try_wait() {
                Ok(Some(status)) => format!("{} ({status})", i + 1),
                _ => format!("{} (running)", i + 1),
            })
            .collect();
        bail!(
            "{} of {} aria2c copies incomplete after {limit:?}: leechers {}",
            incomplete.len(),
            plan.n,
            incomplete.join(", ")
        );
    }
    let seeder_sent = place.run(Spot::Peer(0), || uploaded(rpc))?;
    let cpu = std::iter::once(&seeder)
        .chain(&leechers)
        .map(|c| cpu_of(c.0.id() as i32))
        .sum();
    drop(leechers);
    drop(seeder);
    drop(tracker);
    for (i, copy) in copies.iter().enumerate() {
        if digest_of(copy)? != digest {
            bail!("aria2c leecher {}'s copy differs from the original", i + 1);
        }
    }
    Ok(Run {
        joins,
        done: done.into_iter().map(Option::unwrap_or_default).collect(),
        cpu,
        seeder_sent: seeder_sent as f64,
        tracker_requests: None,
        piece,
    })
}

/// The file [`HOOK`] creates beside a completed download.
fn done_mark(copy: &Path) -> PathBuf {
    let mut name = copy.as_os_str().to_owned();
    name.push(".done");
    PathBuf::from(name)
}

/// aria2c's `--on-bt-download-complete` command, given the download's id, its number of files
/// and the path of its first file: marks the copy complete (seeding goes on).
const HOOK: &str = "#!/bin/sh\ntouch \"$3.done\"\n";

/// aria2c for peer `i` of `plan` in `dir`: seeding on after completion for as long as it
/// runs, its upload capped by its own limiter on loopback; in namespaces the kernel caps it.
fn aria2c(
    place: &Place,
    plan: &Plan,
    i: usize,
    dir: &Path,
    torrent: &Path,
    hook: &Path,
) -> anyhow::Result<Command> {
    std::fs::create_dir_all(dir)?;
    let port = free_port(place, Spot::Peer(i))?;
    let mut cmd = place.command(Spot::Peer(i), "aria2c");
    cmd.args([
        "--no-conf=true",
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--disable-ipv6=true",
        "--seed-ratio=0.0",
        "--file-allocation=none",
        "--summary-interval=0",
        "--console-log-level=error",
        "--quiet=true",
        &format!("--listen-port={port}"),
    ]);
    if matches!(place, Place::Loopback) {
        cmd.arg(format!("--max-overall-upload-limit={}", plan.uploads[i]));
    }
    cmd.arg(format!("--on-bt-download-complete={}", hook.display()))
        .arg(format!("--dir={}", dir.display()))
        .arg(torrent)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(cmd)
}

/// A port free at `spot` right now (the program that gets it binds it a moment later).
fn free_port(place: &Place, spot: Spot) -> anyhow::Result<u16> {
    let ip = place.ip(spot);
    Ok(place
        .run(spot, || TcpListener::bind((ip, 0))?.local_addr())?
        .port())
}

/// Bytes the aria2c at `rpc` uploaded so far (JSON-RPC `aria2.getGlobalStat` has only speeds,
/// so this sums `uploadLength` over its active downloads).
fn uploaded(rpc: SocketAddr) -> anyhow::Result<u64> {
    let body =
        r#"{"jsonrpc":"2.0","id":"b","method":"aria2.tellActive","params":[["uploadLength"]]}"#;
    let mut stream = TcpStream::connect_timeout(&rpc, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "POST /jsonrpc HTTP/1.0\r\nHost: {rpc}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let json = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value: serde_json::Value = serde_json::from_str(json).context("aria2c RPC reply")?;
    let downloads = value["result"].as_array().context("aria2c RPC result")?;
    Ok(downloads
        .iter()
        .filter_map(|d| d["uploadLength"].as_str()?.parse::<u64>().ok())
        .sum())
}

/// A single-file torrent of `path` announced at `announce`, and its info hash in hex.
fn make_torrent(
    path: &Path,
    name: &str,
    piece: u64,
    announce: &str,
) -> anyhow::Result<(Vec<u8>, String)> {
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    let mut pieces = Vec::new();
    let mut buf = vec![0u8; piece as usize];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        pieces.extend_from_slice(&Sha1::digest(&buf[..filled]));
    }
    // Bencode, keys in sorted order.
    let mut info = format!(
        "d6:lengthi{length}e4:name{}:{name}12:piece lengthi{piece}e6:pieces{}:",
        name.len(),
        pieces.len()
    )
    .into_bytes();
    info.extend_from_slice(&pieces);
    info.push(b'e');
    let hash: String = Sha1::digest(&info)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut torrent = format!("d8:announce{}:{announce}4:info", announce.len()).into_bytes();
    torrent.extend_from_slice(&info);
    torrent.push(b'e');
    Ok((torrent, hash))
}
