//! Scenarios 2 and 5, one large file over loopback, unthrottled, 1 MiB chunks. Raw transfer
//! compares a seeder-to-downloader copy with plain TCP copies of the same bytes made in the same
//! run; peer memory reads the peak resident memory of a downloader fetching from four seeders.

use crate::report::{Goal, Outcome, Table};
use crate::{
    common, cpu_of, digest_of, memory_of, secs, start_peer, start_tracker, thread_cpu,
    wait_for_files, Scale, MIB,
};
use anyhow::{bail, Context};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FILE: &str = "big.bin";
/// Reads and writes of the plain copies, like a peer's default chunk.
const BUF: usize = 1 << 20;
/// Goals: throughput at least this fraction of the plain copy; peak memory below this.
const RATIO_GOAL: f64 = 0.7;
const MEMORY_GOAL: u64 = 64 * MIB;

/// A file made for a scenario and the bytes it should arrive as.
struct Original {
    _dir: tempfile::TempDir,
    path: PathBuf,
    size: u64,
    digest: String,
}

impl Original {
    fn make(scale: Scale) -> anyhow::Result<Original> {
        let size = scale.pick(64 * MIB, 1024 * MIB);
        let dir = tempfile::tempdir()?;
        let path = common::make_file(&dir.path().join("origin"), FILE, size as usize, 13);
        // Written back now, not while the first copy is timed.
        std::fs::File::open(&path)?.sync_all()?;
        let digest = digest_of(&path)?;
        Ok(Original {
            _dir: dir,
            path,
            size,
            digest,
        })
    }

    /// A scratch directory beside the original, so every copy lands on the same disk.
    fn scratch(&self, name: &str) -> PathBuf {
        self.path.parent().expect("in a dir").with_file_name(name)
    }

    /// A seeder sharing a hard link of the original: no second copy on disk.
    fn seeder(&self, tracker: SocketAddr, name: &str) -> anyhow::Result<common::Proc> {
        let dir = self.scratch(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::hard_link(&self.path, dir.join(FILE))?;
        Ok(start_peer(tracker, &dir, name, &[]))
    }
}

/// One timed copy of the whole file, and the CPU time each side spent on it.
#[derive(Clone, Copy)]
struct Timed {
    time: Duration,
    receiver_cpu: Duration,
    sender_cpu: Duration,
}

/// What one downloader did.
struct Fetch {
    /// The peer's own measure (locate, fetch, verify, write, sync, rename); CPU of the
    /// downloader and of its seeders meanwhile.
    timed: Timed,
    /// From starting the process until the file was in place.
    wall: Duration,
    peak_memory: u64,
    chunks: f64,
}

/// The copies compared, in table order; the first is Shoal, the second the reference.
const COPIES: [&str; 4] = [
    "shoal seeder -> downloader",
    "plain TCP, file to file + fsync",
    "plain TCP, file to file, no fsync",
    "plain TCP, memory to memory",
];

pub fn raw(scale: Scale) -> anyhow::Result<Outcome> {
    let original = Original::make(scale)?;
    let repeats = scale.pick(1, 5);
    let tracker = start_tracker();
    let seeder = original.seeder(tracker.addr, "seeder")?;
    wait_for_holders(tracker.addr, 1)?;
    let copy = original.scratch("copy");
    let mut samples: [Vec<Timed>; 4] = Default::default();
    let mut fetches = Vec::new();
    // Interleaved, so a burst of load from elsewhere hits every kind alike.
    for i in 0..repeats {
        let fetched = fetch(&original, tracker.addr, &[&seeder], &format!("down{i}"))?;
        samples[0].push(fetched.timed);
        fetches.push(fetched);
        for (k, sync) in [(1, true), (2, false)] {
            samples[k].push(tcp_copy(Source::File(&original.path), Some((&copy, sync)))?);
            // Deleting it drops any unwritten pages, so no writeback spills into the next copy.
            std::fs::remove_file(&copy)?;
        }
        samples[3].push(tcp_copy(Source::Memory(original.size), None)?);
    }
    let medians = samples.clone().map(|mut v| {
        v.sort_by_key(|t| t.time);
        v[v.len() / 2]
    });
    let gib = original.size as f64 / (1024.0 * MIB as f64);
    let rate = |t: &Timed| original.size as f64 / MIB as f64 / t.time.as_secs_f64();
    let (reference, memory) = (rate(&medians[1]), rate(&medians[3]));
    let ratio = rate(&medians[0]) / reference;
    let rows = COPIES
        .iter()
        .zip(&medians)
        .map(|(what, t)| {
            vec![
                what.to_string(),
                secs(t.time),
                format!("{:.0}", rate(t)),
                format!("{:.2}", rate(t) / reference),
                format!("{:.2}", rate(t) / memory),
                format!(
                    "{:.2} + {:.2}",
                    t.receiver_cpu.as_secs_f64() / gib,
                    t.sender_cpu.as_secs_f64() / gib
                ),
            ]
        })
        .collect();
    let json_of = |t: &Timed| {
        json!({"seconds": t.time.as_secs_f64(), "receiver_cpu_seconds": t.receiver_cpu.as_secs_f64(),
               "sender_cpu_seconds": t.sender_cpu.as_secs_f64()})
    };
    let runs: Vec<_> = COPIES
        .iter()
        .zip(&samples)
        .map(|(what, v)| json!({"copy": what, "runs": v.iter().map(json_of).collect::<Vec<_>>()}))
        .collect();
    let downloads: Vec<_> = fetches
        .iter()
        .map(|f| json!({"wall_seconds": f.wall.as_secs_f64(), "peak_memory_bytes": f.peak_memory, "chunks": f.chunks}))
        .collect();
    Ok(Outcome {
        name: "transfer",
        title: "2. Raw transfer",
        settings: vec![
            format!(
                "{} MiB, one seeder to one downloader over 127.0.0.1, unthrottled, SHOAL_CHUNK_SIZE = 1 MiB (the automatic size for 1 GiB), other settings default; median of {repeats}, each kind interleaved with the others",
                original.size / MIB
            ),
            "shoal: the downloader's shoal_peer_download_duration_seconds (locate, fetch, verify every chunk, write, fsync, rename); BLAKE3 of the copy checked".into(),
            format!("plain TCP: a sender thread reading the file in {} KiB blocks and writing them to a socket, a receiver thread writing them to a file on the same disk (then fsync, like a peer, or not); memory: the same without files", BUF / 1024),
            "CPU: user + system seconds per GiB of the receiving side + the sending side (whole processes for Shoal, the two threads for the plain copies)".into(),
        ],
        table: Table {
            head: vec!["copy", "s", "MiB/s", "vs TCP file + fsync", "vs TCP memory", "CPU s/GiB"],
            rows,
        },
        goals: vec![Goal::new(
            format!("throughput ≥ {RATIO_GOAL} of the plain TCP file copy with fsync (is {ratio:.2})"),
            ratio >= RATIO_GOAL,
        )],
        data: json!({
            "bytes": original.size, "ratio_to_tcp_file_copy": ratio,
            "ratio_to_tcp_memory_copy": rate(&medians[0]) / memory,
            "copies": runs, "downloads": downloads,
        }),
    })
}

pub fn peer_memory(scale: Scale) -> anyhow::Result<Outcome> {
    const SEEDERS: usize = 4;
    let original = Original::make(scale)?;
    let tracker = start_tracker();
    let seeders = (0..SEEDERS)
        .map(|i| original.seeder(tracker.addr, &format!("seeder{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_for_holders(tracker.addr, SEEDERS as u64)?;
    let holders: Vec<&common::Proc> = seeders.iter().collect();
    let fetched = fetch(&original, tracker.addr, &holders, "down")?;
    let seeder_peak = seeders
        .iter()
        .map(|s| memory_of(s.pid(), "VmHWM"))
        .max()
        .unwrap_or(0);
    let mib = |b: u64| format!("{:.1}", b as f64 / MIB as f64);
    Ok(Outcome {
        name: "peer_memory",
        title: "5. Peer memory",
        settings: vec![format!(
            "a downloader fetching {} MiB from {SEEDERS} seeders over 127.0.0.1, SHOAL_CHUNK_SIZE = 1 MiB (the automatic size for 1 GiB), other settings default; peak = VmHWM",
            original.size / MIB
        )],
        table: Table {
            head: vec!["process", "peak resident MiB", "fetch s"],
            rows: vec![
                vec!["downloader".into(), mib(fetched.peak_memory), secs(fetched.timed.time)],
                vec!["busiest seeder".into(), mib(seeder_peak), "-".into()],
            ],
        },
        goals: vec![Goal::new(
            format!(
                "downloader peak < {} MiB (is {} MiB)",
                MEMORY_GOAL / MIB,
                mib(fetched.peak_memory)
            ),
            fetched.peak_memory < MEMORY_GOAL,
        )],
        data: json!({
            "bytes": original.size, "seeders": SEEDERS,
            "downloader_peak_bytes": fetched.peak_memory, "seeder_peak_bytes": seeder_peak,
            "fetch_seconds": fetched.timed.time.as_secs_f64(),
        }),
    })
}

fn wait_for_holders(tracker: SocketAddr, n: u64) -> anyhow::Result<()> {
    // A seeder hashes the whole file before it registers.
    if !common::wait_until(Duration::from_secs(120), || {
        common::holder_count(tracker, FILE) == n
    }) {
        bail!("{n} seeders did not register {FILE}");
    }
    Ok(())
}

/// Starts a downloader wanting the file, waits for the complete copy, checks its bytes, reads
/// its measurements, and stops it (it leaves the swarm).
fn fetch(
    original: &Original,
    tracker: SocketAddr,
    seeders: &[&common::Proc],
    name: &str,
) -> anyhow::Result<Fetch> {
    let dir = original.scratch(name);
    let seeders_cpu = || seeders.iter().map(|s| cpu_of(s.pid())).sum::<Duration>();
    let seeders_before = seeders_cpu();
    let started = Instant::now();
    let mut peer = start_peer(tracker, &dir, name, &[("SHOAL_WANT", FILE)]);
    let copy = dir.join(FILE);
    let limit = Duration::from_secs(300);
    let Some(wall) = wait_for_files(&[&copy], started, limit)[0] else {
        bail!("{name} did not complete the download within {limit:?}");
    };
    let timed = Timed {
        time: Duration::from_secs_f64(peer.metric("shoal_peer_download_duration_seconds_sum")),
        receiver_cpu: cpu_of(peer.pid()),
        sender_cpu: seeders_cpu() - seeders_before,
    };
    let fetch = Fetch {
        timed,
        wall,
        peak_memory: memory_of(peer.pid(), "VmHWM"),
        chunks: peer.metric("shoal_peer_chunks_downloaded_total"),
    };
    if digest_of(&copy)? != original.digest {
        bail!("{name}'s copy differs from the original");
    }
    peer.signal("TERM");
    peer.wait_exit(Duration::from_secs(10))
        .with_context(|| format!("{name} did not stop on SIGTERM"))?;
    std::fs::remove_dir_all(&dir)?;
    Ok(fetch)
}

enum Source<'a> {
    Memory(u64),
    File(&'a Path),
}

/// A plain TCP copy over loopback: a sender thread writes `source` to a socket, a receiver
/// thread writes what arrives to the `sink` file (synced if asked, as a peer does) or drops
/// it. Timed from connect to the last byte stored.
fn tcp_copy(source: Source, sink: Option<(&Path, bool)>) -> anyhow::Result<Timed> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = sink.map(|(path, sync)| (path.to_path_buf(), sync));
    let started = Instant::now();
    let receiver = std::thread::spawn(move || -> std::io::Result<(u64, Duration)> {
        let (mut socket, _) = listener.accept()?;
        socket.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut out = match &sink {
            Some((path, _)) => Some(std::fs::File::create(path)?),
            None => None,
        };
        let mut buf = vec![0; BUF];
        let mut total = 0;
        loop {
            let n = socket.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if let Some(f) = out.as_mut() {
                f.write_all(&buf[..n])?;
            }
            total += n as u64;
        }
        if let (Some(f), Some((_, true))) = (out, sink) {
            f.sync_all()?;
        }
        Ok((total, thread_cpu()))
    });
    let sender_cpu = thread_cpu();
    let mut socket = TcpStream::connect(addr)?;
    socket.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = vec![0x5a; BUF];
    let sent = match source {
        Source::Memory(size) => {
            for _ in 0..size / BUF as u64 {
                socket.write_all(&buf)?;
            }
            size
        }
        Source::File(path) => {
            let mut file = std::fs::File::open(path)?;
            let mut total = 0;
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break total;
                }
                socket.write_all(&buf[..n])?;
                total += n as u64;
            }
        }
    };
    drop(socket);
    let sender_cpu = thread_cpu() - sender_cpu;
    let (received, receiver_cpu) = receiver.join().expect("receiver thread")?;
    if received != sent {
        bail!("plain copy received {received} of {sent} bytes");
    }
    Ok(Timed {
        time: started.elapsed(),
        receiver_cpu,
        sender_cpu,
    })
}
