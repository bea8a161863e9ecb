//! Scenarios 3 and 4, the tracker alone under the load generator of [`crate::load`] (running
//! on the same cores): request throughput with many concurrent persistent connections, and
//! resident memory per registered (peer, file) pair, on one tracker and spread over several.
//! Each phase ends with [`load::verify`].

use crate::load::{self, Catalog, Plan, Report};
use crate::report::{Goal, Outcome, Table};
use crate::{memory_of, start_tracker, Proc, Scale, MIB};
use anyhow::bail;
use serde_json::{json, Value};
use shoal::peer::trackers::rendezvous;
use std::sync::Arc;
use std::time::Duration;

/// Chunk registers per second the tracker should sustain.
const THROUGHPUT_GOAL: f64 = 50_000.0;
/// The raw bitset of a 1,024-chunk file, bytes.
const BITSET: f64 = 128.0;
/// Goal: at most twice the bitset plus this fixed cost per (peer, file) pair, bytes.
const PAIR_OVERHEAD: f64 = 64.0;

pub fn throughput(scale: Scale) -> anyhow::Result<Outcome> {
    let connections = scale.pick(64, 256);
    load::require_open_files(1000);
    let registers = chunk_registers(scale, connections)?;
    let (holders, queries) = locations(scale)?;
    let per_sec = registers.rate(shoal::protocol::Msg::ChunkRegister);
    let mut rows = Vec::new();
    for (phase, report) in [("chunk registers", &registers), ("locations", &queries)] {
        for m in report.stats() {
            rows.push(vec![
                phase.into(),
                m.msg.label().into(),
                m.requests.to_string(),
                format!("{:.0}", m.per_second),
                m.p50_us.to_string(),
                m.p99_us.to_string(),
            ]);
        }
    }
    Ok(Outcome {
        name: "tracker_throughput",
        title: "3. Tracker throughput",
        settings: vec![
            format!("chunk registers: {connections} persistent connections, one peer each, 16 requests pipelined per connection, one chunk per message 4, 10 files × 1,024 chunks"),
            format!("locations: {} connections, 16 pipelined, on one file with {} holders, want 50 (the default cap), no hash list", queries.plan.connections, holders.plan.connections * holders.plan.peers_per_connection),
            "latency: from writing the request to reading its reply, so it includes waiting behind the pipelined requests; the generator shares the cores with the tracker".into(),
        ],
        table: Table {
            head: vec!["phase", "message", "requests", "per second", "p50 µs", "p99 µs"],
            rows,
        },
        goals: vec![Goal::new(
            format!("≥ {THROUGHPUT_GOAL:.0} chunk registers/s (is {per_sec:.0})"),
            per_sec >= THROUGHPUT_GOAL,
        )],
        data: json!({
            "chunk_registers": report_json(&registers),
            "locations_holders": report_json(&holders),
            "locations": report_json(&queries),
        }),
    })
}

/// Pipelined single-chunk registers from `connections` peers, on a fresh tracker.
fn chunk_registers(scale: Scale, connections: usize) -> anyhow::Result<Report> {
    let tracker = start_tracker(None);
    let catalog = Arc::new(Catalog::new("thr", 10, 1024, MIB as u32));
    load::seed(tracker.addr, &catalog);
    let plan = Plan {
        label: "thr",
        connections,
        peers_per_connection: 1,
        chunk_registers: scale.pick(200, 4000),
        chunks_per_register: 1,
        locations: 0,
        locations_want: None,
        pipeline: 16,
        time_limit: Duration::from_secs(scale.pick(20, 30)),
    };
    let report = load::run(tracker.addr, &catalog, &plan);
    checked(load::verify(&tracker, &catalog, &[&report]))?;
    Ok(report)
}

/// Locations queries on one file held by 1,000 peers, on a fresh tracker. Returns the run that
/// made the holders and the run that asked.
fn locations(scale: Scale) -> anyhow::Result<(Report, Report)> {
    let tracker = start_tracker(None);
    let catalog = Arc::new(Catalog::new("hot", 1, 1024, MIB as u32));
    load::seed(tracker.addr, &catalog);
    let holders = Plan {
        label: "holder",
        connections: 100,
        peers_per_connection: 10,
        chunk_registers: 1,
        chunks_per_register: 64,
        locations: 0,
        locations_want: None,
        pipeline: 10,
        time_limit: Duration::from_secs(60),
    };
    let holding = load::run(tracker.addr, &catalog, &holders);
    let queries = Plan {
        label: "asker",
        connections: 64,
        peers_per_connection: 1,
        chunk_registers: 0,
        chunks_per_register: 1,
        locations: scale.pick(50, 1000),
        locations_want: Some(50),
        pipeline: 16,
        time_limit: Duration::from_secs(scale.pick(20, 30)),
    };
    let asking = load::run(tracker.addr, &catalog, &queries);
    checked(load::verify(&tracker, &catalog, &[&holding, &asking]))?;
    Ok((holding, asking))
}

pub fn memory(scale: Scale) -> anyhow::Result<Outcome> {
    const FILES: usize = 10;
    let peers_per_connection = scale.pick(10, 40);
    let connections = scale.pick(50, 250);
    load::require_open_files(connections);
    let tracker = start_tracker(None);
    let started = memory_of(tracker.pid(), "VmRSS");
    let catalog = Arc::new(Catalog::new("mem", FILES, 1024, MIB as u32));
    let (before, after, report) =
        register_everything(&tracker, &catalog, connections, peers_per_connection)?;
    let peak = memory_of(tracker.pid(), "VmHWM");
    let peers = connections * peers_per_connection;
    let pairs = (peers * FILES) as f64;
    let per_pair = (after as f64 - before as f64) / pairs;
    let limit = 2.0 * BITSET + PAIR_OVERHEAD;
    let mib = |b: u64| format!("{:.1}", b as f64 / MIB as f64);
    Ok(Outcome {
        name: "tracker_memory",
        title: "4. Tracker memory",
        settings: vec![
            format!("{FILES} files × 1,024 chunks registered once with their hash lists, then {peers} peers each register all 1,024 chunks of every file (one message 4 per file, {connections} connections)"),
            "resident memory from /proc/<pid>/status (VmRSS) before the peers and after them".into(),
        ],
        table: Table {
            head: vec![
                "peers", "pairs", "RSS at start MiB", "RSS before MiB", "RSS after MiB",
                "peak MiB", "bytes per pair", "vs 128 B bitset",
            ],
            rows: vec![vec![
                peers.to_string(),
                format!("{pairs:.0}"),
                mib(started),
                mib(before),
                mib(after),
                mib(peak),
                format!("{per_pair:.0}"),
                format!("{:.2}", per_pair / BITSET),
            ]],
        },
        goals: vec![Goal::new(
            format!("≤ 2 × 128 B + {PAIR_OVERHEAD:.0} B = {limit:.0} B per pair (is {per_pair:.0} B)"),
            per_pair <= limit,
        )],
        data: json!({
            "peers": peers, "files": FILES, "pairs": pairs,
            "rss_start_bytes": started, "rss_before_bytes": before, "rss_after_bytes": after,
            "rss_peak_bytes": peak, "bytes_per_pair": per_pair, "ratio_to_bitset": per_pair / BITSET,
            "load": report_json(&report),
        }),
    })
}

/// Registers `catalog` with `tracker` (hash lists included), then has `connections` ×
/// `peers_per_connection` peers register every chunk of every file of it, one message 4 per
/// file, and checks the tracker's state. Returns the resident memory before the peers and
/// after them, and the load run.
fn register_everything(
    tracker: &Proc,
    catalog: &Arc<Catalog>,
    connections: usize,
    peers_per_connection: usize,
) -> anyhow::Result<(u64, u64, Report)> {
    load::seed(tracker.addr, catalog);
    let before = memory_of(tracker.pid(), "VmRSS");
    let plan = Plan {
        label: "mem",
        connections,
        peers_per_connection,
        chunk_registers: catalog.files.len(),
        chunks_per_register: 1024,
        locations: 0,
        locations_want: None,
        pipeline: 8,
        time_limit: Duration::from_secs(300),
    };
    let report = load::run(tracker.addr, catalog, &plan);
    let after = memory_of(tracker.pid(), "VmRSS");
    checked(load::verify(tracker, catalog, &[&report]))?;
    Ok((before, after, report))
}

fn checked(problems: Vec<String>) -> anyhow::Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    bail!(
        "the tracker's state does not match what was sent:\n{}",
        problems.join("\n")
    )
}

fn report_json(r: &Report) -> Value {
    let messages: Vec<Value> = r
        .stats()
        .iter()
        .map(|m| {
            json!({"message": m.msg.label(), "requests": m.requests, "per_second": m.per_second,
                   "p50_us": m.p50_us, "p99_us": m.p99_us})
        })
        .collect();
    json!({
        "connections": r.plan.connections, "peers": r.plan.connections * r.plan.peers_per_connection,
        "pipeline": r.plan.pipeline, "setup_seconds": r.setup.as_secs_f64(),
        "seconds": r.elapsed.as_secs_f64(), "chunks_recorded": r.recorded, "messages": messages,
    })
}

/// Scenario 6: the same index spread over 1, 3 and 5 trackers, each file owned by two of them
/// (one with a single tracker) as peers place it: every simulated peer registers each file with
/// the file's owners only. The figure is each tracker's resident memory per (peer, file) pair
/// of the whole cluster, which should fall to about `owners / trackers` of one tracker's.
pub fn replicas(scale: Scale) -> anyhow::Result<Outcome> {
    const FILES: usize = 20;
    let peers_per_connection = scale.pick(5, 40);
    let connections = scale.pick(20, 250);
    load::require_open_files(connections);
    let peers = connections * peers_per_connection;
    let pairs = (peers * FILES) as f64;
    let catalog = Catalog::new("rep", FILES, 1024, MIB as u32);
    let mut rows = Vec::new();
    let mut data = Vec::new();
    let mut single = None;
    let mut goals = Vec::new();
    for count in [1, 3, 5] {
        let owners = count.min(2);
        let trackers: Vec<_> = (0..count).map(|_| start_tracker(None)).collect();
        let addrs: Vec<String> = trackers.iter().map(|t| t.addr.to_string()).collect();
        let keys: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let mut grown = Vec::new();
        for (i, tracker) in trackers.iter().enumerate() {
            let owned: Vec<_> = catalog
                .files
                .iter()
                .filter(|f| rendezvous(&keys, &f.info.name)[..owners].contains(&i))
                .cloned()
                .collect();
            if owned.is_empty() {
                grown.push(0.0);
                continue;
            }
            let part = Arc::new(Catalog { files: owned });
            let (before, after, _) =
                register_everything(tracker, &part, connections, peers_per_connection)?;
            grown.push(after.saturating_sub(before) as f64);
        }
        let busiest = grown.iter().copied().fold(0.0, f64::max) / pairs;
        let mean = grown.iter().sum::<f64>() / count as f64 / pairs;
        let base = *single.get_or_insert(busiest);
        let expected = owners as f64 / count as f64;
        rows.push(vec![
            count.to_string(),
            owners.to_string(),
            format!("{pairs:.0}"),
            format!("{busiest:.0}"),
            format!("{mean:.0}"),
            format!("{:.2}", busiest / base),
            format!("{expected:.2}"),
        ]);
        if count > 1 {
            goals.push(Goal::new(
                format!(
                    "{count} trackers: the busiest holds ≤ 1.5 × {owners}/{count} of one tracker's memory (is {:.2})",
                    busiest / base
                ),
                busiest / base <= 1.5 * expected,
            ));
        }
        data.push(json!({
            "trackers": count, "owners": owners, "pairs": pairs,
            "rss_growth_bytes": grown, "busiest_bytes_per_pair": busiest,
            "mean_bytes_per_pair": mean,
        }));
    }
    Ok(Outcome {
        name: "tracker_replicas",
        title: "6. Tracker memory with replicas",
        settings: vec![
            format!("{FILES} files × 1,024 chunks; {peers} peers each register every chunk of every file with the file's owners only (rendezvous hashing of its name over the trackers, two owners, one with a single tracker)"),
            "per tracker: resident memory (VmRSS) growth while the peers register, divided by the (peer, file) pairs of the whole cluster".into(),
        ],
        table: Table {
            head: vec![
                "trackers", "owners per file", "cluster pairs", "busiest B/pair",
                "mean B/pair", "busiest vs 1 tracker", "owners / trackers",
            ],
            rows,
        },
        goals,
        data: json!({ "runs": data }),
    })
}

/// One index shape of the scale scenario.
struct Shape {
    files: usize,
    chunks: u32,
    /// Chunks per message 4; each peer sends [`SCALE_REGISTERS`] of them.
    chunks_per_register: u32,
}

/// Message-4 requests per simulated peer in the scale scenario.
const SCALE_REGISTERS: usize = 10;

/// Scenario 7: the tracker with 10,000 simulated peers, all on one file (every locations query
/// picks its 50 from 10,000 holders) and spread over 1,000 files (about 100 holders each):
/// latency of locations and chunk registers sent together, and the tracker's memory.
pub fn scale(scale: Scale) -> anyhow::Result<Outcome> {
    let connections = scale.pick(20, 250);
    let peers_per_connection = scale.pick(10, 40);
    let peers = connections * peers_per_connection;
    load::require_open_files(connections);
    let shapes = [
        Shape {
            files: 1,
            chunks: 256,
            chunks_per_register: 16,
        },
        Shape {
            files: scale.pick(50, 1000),
            chunks: 256,
            chunks_per_register: 256,
        },
    ];
    let mut rows = Vec::new();
    let mut data = Vec::new();
    let mut p99 = Vec::new();
    for shape in &shapes {
        let tracker = start_tracker(None);
        let catalog = Arc::new(Catalog::new("scale", shape.files, shape.chunks, MIB as u32));
        load::seed(tracker.addr, &catalog);
        let before = memory_of(tracker.pid(), "VmRSS");
        let plan = Plan {
            label: "scale",
            connections,
            peers_per_connection,
            chunk_registers: SCALE_REGISTERS,
            chunks_per_register: shape.chunks_per_register,
            locations: scale.pick(20, 200),
            locations_want: Some(50),
            pipeline: 4,
            time_limit: Duration::from_secs(300),
        };
        let report = load::run(tracker.addr, &catalog, &plan);
        let after = memory_of(tracker.pid(), "VmRSS");
        checked(load::verify(&tracker, &catalog, &[&report]))?;
        let holders = holders_per_file(&report, shape, peers);
        let mib = format!("{:.1}", after as f64 / MIB as f64);
        let index = match shape.files {
            1 => "one file".to_string(),
            n => format!("{n} files"),
        };
        for m in report.stats() {
            if m.msg == shoal::protocol::Msg::Locations {
                p99.push(m.p99_us);
            }
            rows.push(vec![
                index.clone(),
                shape.files.to_string(),
                format!("{holders:.0}"),
                m.msg.label().into(),
                m.requests.to_string(),
                format!("{:.0}", m.per_second),
                m.p50_us.to_string(),
                m.p99_us.to_string(),
                mib.clone(),
            ]);
        }
        data.push(json!({
            "index": index, "files": shape.files, "chunks_per_file": shape.chunks,
            "holders_per_file": holders, "rss_before_bytes": before, "rss_after_bytes": after,
            "load": report_json(&report),
        }));
    }
    // Work per query that grew with the holders would show as a p99 that grows with them.
    let (crowded, spread) = (p99[0] as f64, p99[1] as f64);
    Ok(Outcome {
        name: "tracker_scale",
        title: "7. Tracker at scale",
        settings: vec![
            format!("{peers} simulated peers on {connections} persistent connections ({peers_per_connection} peers each, 4 requests pipelined per connection); each peer sends {SCALE_REGISTERS} chunk registers (message 4) while every connection also asks {} locations queries (message 3, want 50, no hash list), all at once", scale.pick(20, 200)),
            format!("files of 256 chunks; one file: each message 4 names 16 chunks; {} files: each message 4 names a whole file, so every peer holds {SCALE_REGISTERS} files", shapes[1].files),
            "latency: from writing the request to reading its reply, so it includes waiting behind the pipelined requests; the generator shares the cores with the tracker. RSS: the tracker's VmRSS after the run".into(),
        ],
        table: Table {
            head: vec![
                "index", "files", "holders per file", "message", "requests", "per second",
                "p50 µs", "p99 µs", "tracker RSS MiB",
            ],
            rows,
        },
        goals: vec![Goal::new(
            format!(
                "locations p99 with every peer on one file ≤ 2 × with the peers spread over {} files (is {:.2})",
                shapes[1].files,
                crowded / spread.max(1.0)
            ),
            crowded <= 2.0 * spread,
        )],
        data: json!({ "peers": peers, "shapes": data }),
    })
}

/// The mean number of holders per file at the end of a scale run.
fn holders_per_file(report: &Report, shape: &Shape, peers: usize) -> f64 {
    if shape.files == 1 {
        return peers as f64;
    }
    // Whole-file registers: every answered one makes its peer a holder of one more file.
    report.done.iter().sum::<usize>() as f64 / shape.files as f64
}
