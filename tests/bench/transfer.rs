//! Scenarios 2 and 5, one large file over loopback, unthrottled, 1 MiB chunks. Raw transfer
//! compares a seeder-to-downloader copy, in clear text and in mutual TLS, with plain TCP copies of
//! the same bytes made in the same run; peer memory reads the peak resident memory of a downloader fetching from four seeders.

use crate::report::{Goal, Outcome, Table};
use crate::{
    common, cpu_of, digest_of, memory_of, secs, start_peer, start_tracker, thread_cpu,
    tls_settings, wait_for_files, Scale, MIB,
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
/// Goals: throughput at least this fraction of the plain copy (and TLS at least this fraction
/// of clear text); peak memory below this.
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
    fn seeder(
        &self,
        tracker: SocketAddr,
        name: &str,
        tls: Option<&common::Certs>,
    ) -> anyhow::Result<common::Proc> {
        let dir = self.scratch(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::hard_link(&self.path, dir.join(FILE))?;
        let tls = tls_settings(tls, "p0");
        Ok(start_peer(tracker, &dir, name, &common::env_refs(&tls)))
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

/// What a copy's receiver writes into. On this kind of virtual machine (virtio-balloon free page
/// reporting) memory that has been free for about 2 s is handed back to the host, and the first
/// write into each such page costs a fault in the host: `dd bs=1M count=1024` into the page cache
/// took 0.25-0.31 s right after a 1 GiB file was deleted and 1.8-2.2 s five seconds later. Each
/// copy starts under a stated condition, so no kind gets memory another kind just freed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pages {
    /// Memory freed a moment ago (a scratch file of the copy's size written and deleted just
    /// before), as on a machine without free page reporting.
    Recycled,
    /// Memory the host has taken back (nothing freed for [`HAND_BACK`]).
    Fresh,
}

/// Comfortably longer than the kernel's 2 s page reporting delay.
const HAND_BACK: Duration = Duration::from_secs(5);

impl Pages {
    /// Puts the machine's free memory in this condition; call right before a timed copy.
    fn prepare(self, original: &Original) -> anyhow::Result<()> {
        match self {
            Pages::Recycled => {
                let scratch = original.scratch("recycle");
                let mut out = std::fs::File::create(&scratch)?;
                let block = vec![0; BUF];
                for _ in 0..original.size / BUF as u64 {
                    out.write_all(&block)?;
                }
                drop(out);
                std::fs::remove_file(&scratch)?;
            }
            Pages::Fresh => std::thread::sleep(HAND_BACK),
        }
        Ok(())
    }

    fn name(self) -> &'static str {
        match self {
            Pages::Recycled => "recycled",
            Pages::Fresh => "fresh",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Shoal { tls: bool },
    TcpFile { sync: bool },
    TcpMemory,
}

/// The copies compared, in table order. Each Shoal row is compared with the plain copy with
/// fsync that began with the same kind of memory.
const COPIES: [(&str, Kind, Pages); 7] = [
    (
        "shoal seeder -> downloader",
        Kind::Shoal { tls: false },
        Pages::Recycled,
    ),
    (
        "shoal, mutual TLS",
        Kind::Shoal { tls: true },
        Pages::Recycled,
    ),
    (
        "plain TCP, file to file + fsync",
        Kind::TcpFile { sync: true },
        Pages::Recycled,
    ),
    (
        "plain TCP, file to file, no fsync",
        Kind::TcpFile { sync: false },
        Pages::Recycled,
    ),
    (
        "plain TCP, memory to memory",
        Kind::TcpMemory,
        Pages::Recycled,
    ),
    (
        "shoal seeder -> downloader",
        Kind::Shoal { tls: false },
        Pages::Fresh,
    ),
    (
        "plain TCP, file to file + fsync",
        Kind::TcpFile { sync: true },
        Pages::Fresh,
    ),
];

/// The row of the plain copy with fsync that began with `pages`.
fn reference(pages: Pages) -> usize {
    COPIES
        .iter()
        .position(|&(_, kind, p)| kind == Kind::TcpFile { sync: true } && p == pages)
        .expect("a reference for every condition")
}

pub fn raw(scale: Scale) -> anyhow::Result<Outcome> {
    let original = Original::make(scale)?;
    let repeats = scale.pick(1, 5);
    let certs = common::Certs::new(1);
    let clear = Swarm::start(&original, None)?;
    let tls = Swarm::start(&original, Some(&certs))?;
    let copy = original.scratch("copy");
    let mut samples: [Vec<Timed>; COPIES.len()] = Default::default();
    let mut fetches = Vec::new();
    // Interleaved, so a burst of load from elsewhere hits every kind alike.
    for i in 0..repeats {
        for (k, &(_, kind, pages)) in COPIES.iter().enumerate() {
            pages.prepare(&original)?;
            let timed = match kind {
                Kind::Shoal { tls: secure } => {
                    let swarm = if secure { &tls } else { &clear };
                    let name = format!("down{i}-{}-{}", pages.name(), swarm.label());
                    let fetched = fetch(&original, swarm, &name)?;
                    let timed = fetched.timed;
                    fetches.push((pages, fetched));
                    timed
                }
                Kind::TcpFile { sync } => {
                    let timed = tcp_copy(Source::File(&original.path), Some((&copy, sync)))?;
                    std::fs::remove_file(&copy)?;
                    timed
                }
                Kind::TcpMemory => tcp_copy(Source::Memory(original.size), None)?,
            };
            samples[k].push(timed);
        }
    }
    let medians = samples.clone().map(|mut v| {
        v.sort_by_key(|t| t.time);
        v[v.len() / 2]
    });
    let gib = original.size as f64 / (1024.0 * MIB as f64);
    let rate = |t: &Timed| original.size as f64 / MIB as f64 / t.time.as_secs_f64();
    let memory = rate(
        &medians[COPIES
            .iter()
            .position(|c| c.1 == Kind::TcpMemory)
            .expect("row")],
    );
    let versus = |k: usize| rate(&medians[k]) / rate(&medians[reference(COPIES[k].2)]);
    let row_of = |tls: bool, pages: Pages| {
        COPIES
            .iter()
            .position(|c| c.1 == Kind::Shoal { tls } && c.2 == pages)
            .expect("a Shoal row for every condition")
    };
    let (ratio, fresh_ratio) = (
        versus(row_of(false, Pages::Recycled)),
        versus(row_of(false, Pages::Fresh)),
    );
    let tls_ratio = rate(&medians[row_of(true, Pages::Recycled)])
        / rate(&medians[row_of(false, Pages::Recycled)]);
    let rows = COPIES
        .iter()
        .zip(&medians)
        .enumerate()
        .map(|(k, ((what, _, pages), t))| {
            vec![
                what.to_string(),
                pages.name().to_string(),
                secs(t.time),
                format!("{:.0}", rate(t)),
                format!("{:.2}", versus(k)),
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
        .map(|((what, _, pages), v)| json!({"copy": what, "memory": pages.name(), "runs": v.iter().map(json_of).collect::<Vec<_>>()}))
        .collect();
    let downloads: Vec<_> = fetches
        .iter()
        .map(|(pages, f)| json!({"memory": pages.name(), "wall_seconds": f.wall.as_secs_f64(), "peak_memory_bytes": f.peak_memory, "chunks": f.chunks}))
        .collect();
    Ok(Outcome {
        name: "transfer",
        title: "2. Raw transfer",
        settings: vec![
            format!(
                "{} MiB, one seeder to one downloader over 127.0.0.1, unthrottled, SHOAL_CHUNK_SIZE = 1 MiB (the automatic size for 1 GiB), other settings default; median of {repeats}, each kind interleaved with the others",
                original.size / MIB
            ),
            "shoal: the downloader's shoal_peer_download_duration_seconds (locate, fetch, verify every chunk, write, fsync, rename); BLAKE3 of the copy checked. mutual TLS: the same with SHOAL_TLS_CERT/KEY/CA on a tracker, seeder and downloader of their own (rustls, ring, TLS 1.3)".into(),
            format!("plain TCP: a sender thread reading the file in {} KiB blocks and writing them to a socket, a receiver thread writing them to a file on the same disk (then fsync, like a peer, or not); memory: the same without files", BUF / 1024),
            "CPU: user + system seconds per GiB of the receiving side + the sending side (whole processes for Shoal, the two threads for the plain copies)".into(),
            format!("memory: what the receiver writes into. On a VM that hands free memory back to its host (virtio-balloon free page reporting, as here), a page cache write into memory free for over 2 s costs a host fault per page. recycled: a scratch file of the same size was written and deleted just before the copy (as on a machine without reporting); fresh: nothing was freed for {} s before it. \"vs TCP file + fsync\" compares with the plain copy with fsync into the same kind of memory", HAND_BACK.as_secs()),
        ],
        table: Table {
            head: vec!["copy", "memory", "s", "MiB/s", "vs TCP file + fsync", "vs TCP memory", "CPU s/GiB"],
            rows,
        },
        goals: [(Pages::Recycled, ratio), (Pages::Fresh, fresh_ratio)]
            .map(|(pages, r)| {
                Goal::new(
                    format!("throughput ≥ {RATIO_GOAL} of the plain TCP file copy with fsync, both into {} memory (is {r:.2})", pages.name()),
                    r >= RATIO_GOAL,
                )
            })
            .into_iter()
            .chain([Goal::new(
                format!("mutual TLS throughput ≥ {RATIO_GOAL} of clear text, both into recycled memory (is {tls_ratio:.2})"),
                tls_ratio >= RATIO_GOAL,
            )])
            .collect(),
        data: json!({
            "bytes": original.size, "ratio_to_tcp_file_copy": ratio,
            "tls_ratio_to_clear": tls_ratio,
            "ratio_to_tcp_file_copy_fresh_memory": fresh_ratio,
            "ratio_to_tcp_memory_copy": rate(&medians[0]) / memory,
            "copies": runs, "downloads": downloads,
        }),
    })
}

pub fn peer_memory(scale: Scale) -> anyhow::Result<Outcome> {
    const SEEDERS: usize = 4;
    let original = Original::make(scale)?;
    let tracker = start_tracker(None);
    let seeders = (0..SEEDERS)
        .map(|i| original.seeder(tracker.addr, &format!("seeder{i}"), None))
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_for_holders(tracker.addr, SEEDERS as u64, None)?;
    let swarm = Swarm {
        tracker,
        seeders,
        tls: None,
    };
    let fetched = fetch(&original, &swarm, "down")?;
    let seeder_peak = swarm
        .seeders
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

/// A tracker and the seeders a downloader fetches from, in one mode.
struct Swarm<'a> {
    tracker: common::Proc,
    seeders: Vec<common::Proc>,
    tls: Option<&'a common::Certs>,
}

impl<'a> Swarm<'a> {
    /// A tracker and one seeder of `original`, registered; in mutual TLS with `tls`.
    fn start(original: &Original, tls: Option<&'a common::Certs>) -> anyhow::Result<Swarm<'a>> {
        let tracker = start_tracker(tls);
        let label = if tls.is_some() {
            "seeder-tls"
        } else {
            "seeder"
        };
        let seeder = original.seeder(tracker.addr, label, tls)?;
        wait_for_holders(tracker.addr, 1, tls)?;
        Ok(Swarm {
            tracker,
            seeders: vec![seeder],
            tls,
        })
    }

    fn label(&self) -> &'static str {
        if self.tls.is_some() {
            "tls"
        } else {
            "clear"
        }
    }
}

fn wait_for_holders(
    tracker: SocketAddr,
    n: u64,
    tls: Option<&common::Certs>,
) -> anyhow::Result<()> {
    // A seeder hashes the whole file before it registers.
    if !common::wait_until(Duration::from_secs(120), || {
        common::holder_count_in(tracker, FILE, tls) == n
    }) {
        bail!("{n} seeders did not register {FILE}");
    }
    Ok(())
}

/// Starts a downloader wanting the file, waits for the complete copy, checks its bytes, reads
/// its measurements, and stops it (it leaves the swarm).
fn fetch(original: &Original, swarm: &Swarm, name: &str) -> anyhow::Result<Fetch> {
    let dir = original.scratch(name);
    let seeders_cpu = || {
        swarm
            .seeders
            .iter()
            .map(|s| cpu_of(s.pid()))
            .sum::<Duration>()
    };
    let seeders_before = seeders_cpu();
    let tls = tls_settings(swarm.tls, "p0");
    let mut settings = vec![("SHOAL_WANT", FILE)];
    settings.extend(common::env_refs(&tls));
    let started = Instant::now();
    let mut peer = start_peer(swarm.tracker.addr, &dir, name, &settings);
    let copy = dir.join(FILE);
    let limit = Duration::from_secs(300);
    let Some(wall) = wait_for_files(&[&copy], started, limit)[0] else {
        bail!("{name} did not complete the download within {limit:?}");
    };
    // The peer times the download just after the file is in place.
    let timed_it = || peer.metric("shoal_peer_download_duration_seconds_count") >= 1.0;
    if !common::wait_until(Duration::from_secs(10), timed_it) {
        bail!("{name} did not record its download's duration");
    }
    let timed = Timed {
        time: Duration::from_secs_f64(peer.metric("shoal_peer_download_duration_seconds_sum")),
        receiver_cpu: cpu_of(peer.pid()),
        sender_cpu: seeders_cpu() - seeders_before,
    };
    let fetch = Fetch {
        timed,
        wall,
        peak_memory: memory_of(peer.pid(), "VmHWM"),
        chunks: peer.metric("shoal_peer_downloaded_chunks_total"),
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
