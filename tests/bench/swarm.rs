//! Scenario 1, swarm distribution: one seeder and N downloaders of an F-byte file, every peer's
//! upload capped, Shoal and BitTorrent (opentracker + aria2c) side by side on the same file and
//! caps in the same run. `swarm` caps on 127.0.0.1 by each program's own limiter; `swarm_net`
//! runs every peer in its own network namespace with the caps enforced by the kernel (`tc`).
//!
//! Each row is (N, F, U, variant). T is the time from starting the downloaders until every copy
//! is complete; T* the lower bound generalised to peers joining over time: peer i, joining at
//! t_i when the downloaders P_i = {j : t_j ≤ t_i} are present, cannot be done before
//! t_i + b_i, b_i = max(F/u_s, |P_i|·F/(u_s + Σ_{j∈P_i} u_j), F/d), and T* = max_i (t_i + b_i).
//! All joining at once, that is max(F/u_s, N·F/(u_s + Σ u_i)).

use crate::netns::{Fabric, Links, Place, Spot};
use crate::report::{Goal, Outcome, Table};
use crate::{
    bittorrent, common, digest_of, start_peer_at, start_tracker_at, tls_settings, Scale, MIB,
};
use anyhow::{bail, Context};
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const FILE: &str = "swarm.bin";
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Every peer at U, every downloader starting at once.
    Uniform,
    /// Half the downloaders (the even ones) at U/4.
    Uneven,
    /// Downloaders joining one per second.
    Joins,
    /// Every peer at U both ways (kernel caps only).
    Download,
    /// Uniform, every connection in mutual TLS (Shoal only: aria2c has no counterpart).
    Tls,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Uniform => "uniform",
            Variant::Uneven => "half at U/4",
            Variant::Joins => "joins 1/s",
            Variant::Download => "download at U too",
            Variant::Tls => "mutual TLS",
        }
    }
}

struct Row {
    n: usize,
    mib: u64,
    /// U, MiB/s.
    up: u64,
    variant: Variant,
}

impl Row {
    fn label(&self) -> String {
        format!(
            "N = {}, F = {} MiB, U = {} MiB/s, {}",
            self.n,
            self.mib,
            self.up,
            self.variant.name()
        )
    }
}

const fn row(n: usize, mib: u64, up: u64, variant: Variant) -> Row {
    Row {
        n,
        mib,
        up,
        variant,
    }
}

use Variant::{Download, Joins, Tls, Uneven, Uniform};

/// Loopback rows, caps by each program's limiter, smoke then full. The full scale takes about
/// 12 minutes on 2 cores (each row about 3.5 T*, Shoal then aria2c, plus start-up): the largest
/// N on the smallest files, the largest file with a small N.
const LOOPBACK_ROWS: [&[Row]; 2] = [
    &[
        row(2, 8, 4, Uniform),
        row(2, 8, 4, Uneven),
        row(2, 8, 4, Joins),
        row(2, 8, 4, Tls),
    ],
    &[
        row(8, 32, 8, Uniform),
        row(16, 32, 4, Uniform),
        row(32, 64, 4, Uniform),
        row(64, 16, 2, Uniform),
        row(64, 64, 4, Uniform),
        row(128, 16, 1, Uniform),
        row(256, 16, 1, Uniform),
        row(16, 256, 8, Uniform),
        row(16, 32, 4, Uneven),
        row(16, 32, 4, Joins),
        row(16, 32, 4, Tls),
    ],
];

/// Namespace rows, caps by the kernel, smoke then full.
const KERNEL_ROWS: [&[Row]; 2] = [
    &[row(2, 4, 2, Uniform), row(2, 4, 2, Download)],
    &[
        row(16, 32, 4, Uniform),
        row(16, 32, 4, Download),
        row(64, 16, 2, Uniform),
    ],
];

/// The rows of `rows` the command line keeps (`n=N`).
fn chosen(rows: &'static [Row]) -> impl Iterator<Item = &'static Row> {
    let sizes = &crate::options().sizes;
    rows.iter()
        .filter(move |r| sizes.is_empty() || sizes.contains(&r.n))
}

/// What one row asks of a swarm, whoever runs it.
pub struct Plan {
    pub n: usize,
    pub size: u64,
    /// Upload caps, bytes/s: the seeder's first, then downloader 1..=N's.
    pub uploads: Vec<u64>,
    /// Every downloader's download cap, bytes/s, if any.
    pub download: Option<u64>,
    /// When each downloader starts, from the first.
    pub joins: Vec<Duration>,
}

impl Plan {
    fn of(row: &Row) -> Plan {
        let up = row.up * MIB;
        let uploads = (0..=row.n)
            .map(|i| match row.variant {
                Variant::Uneven if i > 0 && i % 2 == 0 => up / 4,
                _ => up,
            })
            .collect();
        let joins = (0..row.n)
            .map(|i| match row.variant {
                Variant::Joins => Duration::from_secs(i as u64),
                _ => Duration::ZERO,
            })
            .collect();
        Plan {
            n: row.n,
            size: row.mib * MIB,
            uploads,
            download: (row.variant == Variant::Download).then_some(up),
            joins,
        }
    }

    /// b_i for each downloader joining at `joins[i]` (see the module's formula), seconds.
    fn own_bounds(&self, joins: &[Duration]) -> Vec<f64> {
        let f = self.size as f64;
        let seeder = self.uploads[0] as f64;
        joins
            .iter()
            .map(|&t| {
                let present: Vec<usize> = (0..joins.len()).filter(|&j| joins[j] <= t).collect();
                let upload: f64 = present.iter().map(|&j| self.uploads[j + 1] as f64).sum();
                let shared = present.len() as f64 * f / (seeder + upload);
                let download = self.download.map_or(0.0, |d| f / d as f64);
                (f / seeder).max(shared).max(download)
            })
            .collect()
    }

    /// T* for downloaders joining at `joins`, seconds.
    fn bound(&self, joins: &[Duration]) -> f64 {
        joins
            .iter()
            .zip(self.own_bounds(joins))
            .map(|(t, b)| t.as_secs_f64() + b)
            .fold(0.0, f64::max)
    }

    /// How long to wait for every copy before calling the run failed.
    pub fn wait_limit(&self) -> Duration {
        Duration::from_secs_f64(self.bound(&self.joins) * 8.0 + 60.0)
    }
}

/// What one program's swarm did.
pub struct Run {
    /// When each downloader started and finished, from the first start.
    pub joins: Vec<Duration>,
    pub done: Vec<Duration>,
    /// User + system CPU of every peer process (seeder included).
    pub cpu: Duration,
    /// Bytes the seeder uploaded.
    pub seeder_sent: f64,
    /// Requests the tracker answered (Shoal's tracker counts them).
    pub tracker_requests: Option<f64>,
    /// Chunk (piece) size, bytes.
    pub piece: u64,
}

impl Run {
    fn time(&self) -> f64 {
        self.done
            .iter()
            .map(Duration::as_secs_f64)
            .fold(0.0, f64::max)
    }

    fn ratio(&self, plan: &Plan) -> f64 {
        self.time() / plan.bound(&self.joins)
    }

    fn cpu_per_gib(&self, plan: &Plan) -> f64 {
        self.cpu.as_secs_f64() / (plan.n as f64 * plan.size as f64 / GIB)
    }

    fn seeder_copies(&self, plan: &Plan) -> f64 {
        self.seeder_sent / plan.size as f64
    }

    /// Tracker requests per chunk delivered to a downloader.
    fn requests_per_chunk(&self, plan: &Plan) -> Option<f64> {
        let chunks = plan.n as f64 * plan.size.div_ceil(self.piece) as f64;
        self.tracker_requests.map(|r| r / chunks)
    }

    /// p50, p99 and max of each downloader's (done - join) / b_i.
    fn own_ratios(&self, plan: &Plan) -> [f64; 3] {
        let mut ratios: Vec<f64> = self
            .done
            .iter()
            .zip(&self.joins)
            .zip(plan.own_bounds(&self.joins))
            .map(|((d, j), b)| d.saturating_sub(*j).as_secs_f64() / b)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
        [at(0.5), at(0.99), at(1.0)]
    }

    fn json(&self, plan: &Plan) -> serde_json::Value {
        let [p50, p99, max] = self.own_ratios(plan);
        json!({
            "seconds": self.time(), "bound_seconds": plan.bound(&self.joins),
            "ratio_to_bound": self.ratio(plan), "cpu_seconds": self.cpu.as_secs_f64(),
            "cpu_seconds_per_gib": self.cpu_per_gib(plan),
            "seeder_uploaded_copies": self.seeder_copies(plan),
            "tracker_requests": self.tracker_requests,
            "tracker_requests_per_chunk": self.requests_per_chunk(plan),
            "piece_bytes": self.piece,
            "own_ratio": {"p50": p50, "p99": p99, "max": max},
            "joins_seconds": self.joins.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "done_seconds": self.done.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        })
    }
}

/// One row's measurements: Shoal's, and BitTorrent's unless it was skipped.
struct Measured {
    row: &'static Row,
    plan: Plan,
    shoal: Run,
    /// `Err`: why aria2c did not complete the row (shown in the table; Shoal's figures stand).
    bittorrent: Option<Result<Run, String>>,
}

/// `swarm`: caps by the programs' limiters on 127.0.0.1.
pub fn run(scale: Scale) -> anyhow::Result<Outcome> {
    let skipped = bittorrent_skipped();
    let mut measured = Vec::new();
    for row in chosen(scale.pick(LOOPBACK_ROWS[0], LOOPBACK_ROWS[1])) {
        measured.push(measure(row, &Place::Loopback, skipped.is_none())?);
    }
    Ok(outcome(
        "swarm",
        "1. Swarm distribution",
        "on 127.0.0.1; every peer's upload capped by its own limiter (SHOAL_UPLOAD_LIMIT, aria2c --max-overall-upload-limit)",
        skipped,
        &measured,
    ))
}

/// `swarm_net`: every peer in its own network namespace, caps by the kernel.
pub fn net(scale: Scale) -> anyhow::Result<Outcome> {
    const TITLE: &str = "1b. Swarm distribution, caps set by the network";
    const CAPS: &str = "every peer in its own network namespace, linked by a veth pair to a bridge in the tracker's namespace; each peer's upload (and in the `download` rows its download) capped by `tc` `tbf` on its link, SHOAL_UPLOAD_LIMIT unset, aria2c unlimited";
    if let Some(why) = crate::netns::unavailable() {
        println!("  swarm_net skipped: {why}");
        let skipped = Some(format!("skipped: {why}"));
        return Ok(outcome("swarm_net", TITLE, CAPS, skipped, &[]));
    }
    let skipped = bittorrent_skipped();
    let mut measured = Vec::new();
    let mut checks = Vec::new();
    for row in chosen(scale.pick(KERNEL_ROWS[0], KERNEL_ROWS[1])) {
        let plan = Plan::of(row);
        let fabric = Fabric::new(&Links {
            upload: plan.uploads.clone(),
            download: plan.download,
        })?;
        let upload = fabric.measure(0, true, 2.0)?;
        let mut check = check_cap("upload", upload, plan.uploads[0])?;
        if let Some(cap) = plan.download {
            let download = fabric.measure(0, false, 2.0)?;
            check += &format!(", {}", check_cap("download", download, cap)?);
        }
        checks.push(format!("{}: {check}", row.label()));
        measured.push(measure(row, &Place::Kernel(fabric), skipped.is_none())?);
    }
    let mut out = outcome("swarm_net", TITLE, CAPS, skipped, &measured);
    out.settings.push(format!(
        "caps checked before each row with one unthrottled TCP stream over the seeder's link: {}",
        checks.join("; ")
    ));
    Ok(out)
}

/// "BitTorrent skipped: why", printed at once, if aria2c does not run beside Shoal.
fn bittorrent_skipped() -> Option<String> {
    let why = bittorrent::unavailable()?;
    println!("  BitTorrent skipped: {why}");
    Some(format!("BitTorrent skipped: {why}"))
}

/// A measured link rate against its `tc` cap: fails if the cap does not hold.
fn check_cap(way: &str, measured: f64, cap: u64) -> anyhow::Result<String> {
    let share = measured / cap as f64;
    if share > 1.1 {
        bail!(
            "the {way} cap does not hold: {:.2} MiB/s measured at a {:.2} MiB/s tc rate",
            measured / MIB as f64,
            cap as f64 / MIB as f64
        );
    }
    Ok(format!(
        "{way} {:.2} MiB/s at {:.2} MiB/s ({:.0} %)",
        measured / MIB as f64,
        cap as f64 / MIB as f64,
        100.0 * share
    ))
}

/// Runs one row with Shoal, then (if `bittorrent`) aria2c, on one file.
fn measure(row: &'static Row, place: &Place, bittorrent: bool) -> anyhow::Result<Measured> {
    let plan = Plan::of(row);
    let what = row.label();
    println!("  {what}");
    let root = tempfile::tempdir()?;
    let original = common::make_file(&root.path().join("origin"), FILE, plan.size as usize, 11);
    let digest = digest_of(&original)?;
    let tls = row.variant == Variant::Tls;
    let shoal = distribute(
        &plan,
        place,
        tls,
        &root.path().join("shoal"),
        &original,
        &digest,
    )
    .with_context(|| format!("Shoal, {what}"))?;
    let bittorrent = if bittorrent && row.variant != Variant::Tls {
        let dir = root.path().join("bittorrent");
        let run = bittorrent::distribute(&plan, place, &dir, &original, &digest, shoal.piece)
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &run {
            println!("  aria2c failed, {what}: {e}");
        }
        Some(run)
    } else {
        None
    };
    Ok(Measured {
        row,
        plan,
        shoal,
        bittorrent,
    })
}

/// One Shoal seeder and `plan.n` downloaders on a fresh tracker, every connection in mutual TLS
/// with `tls`; returns when every copy is verified.
fn distribute(
    plan: &Plan,
    place: &Place,
    tls: bool,
    dir: &Path,
    original: &Path,
    digest: &str,
) -> anyhow::Result<Run> {
    let certs = tls.then(|| common::Certs::new(1));
    let tracker = start_tracker_at(place, certs.as_ref());
    let limits: Vec<String> = plan.uploads.iter().map(u64::to_string).collect();
    let tls_env = tls_settings(certs.as_ref(), "p0");
    let settings = |i: usize| -> Vec<(&str, &str)> {
        let mut s = vec![("SHOAL_WANT", FILE)];
        if matches!(place, Place::Loopback) {
            s.push(("SHOAL_UPLOAD_LIMIT", &limits[i]));
        }
        s.extend(common::env_refs(&tls_env));
        s
    };
    let seed_dir = dir.join("seeder");
    std::fs::create_dir_all(&seed_dir)?;
    std::fs::hard_link(original, seed_dir.join(FILE))?;
    let seeder = start_peer_at(place, 0, tracker.addr, &seed_dir, "seeder", &settings(0));
    if !common::wait_until(Duration::from_secs(20), || {
        place.run(Spot::Hub, || {
            common::holder_count_in(tracker.addr, FILE, certs.as_ref()) == 1
        })
    }) {
        bail!("the seeder did not register {FILE}");
    }
    let dirs: Vec<_> = (1..=plan.n).map(|i| dir.join(format!("peer{i}"))).collect();
    let copies: Vec<_> = dirs.iter().map(|d| d.join(FILE)).collect();
    let limit = plan.wait_limit();
    let started = Instant::now();
    let mut done: Vec<Option<Duration>> = vec![None; plan.n];
    let (peers, joins): (Vec<common::Proc>, Vec<Duration>) = std::thread::scope(|s| {
        let starters: Vec<_> = (1..=plan.n)
            .map(|i| {
                let (dir, settings, tracker) = (&dirs[i - 1], settings(i), tracker.addr);
                let at = started + plan.joins[i - 1];
                s.spawn(move || {
                    // Schedule, not synchronisation: the plan says when each peer joins.
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    let joined = started.elapsed();
                    let peer =
                        start_peer_at(place, i, tracker, dir, &format!("peer{i}"), &settings);
                    (peer, joined)
                })
            })
            .collect();
        common::wait_until(limit, || {
            for (copy, d) in copies.iter().zip(done.iter_mut()) {
                if d.is_none() && copy.exists() {
                    *d = Some(started.elapsed());
                }
            }
            done.iter().all(Option::is_some)
        });
        starters
            .into_iter()
            .map(|h| h.join().expect("peer started"))
            .unzip()
    });
    let Some(done) = done.into_iter().collect::<Option<Vec<_>>>() else {
        bail!("some of {} copies incomplete after {limit:?}", plan.n);
    };
    let cpu = std::iter::once(&seeder)
        .chain(&peers)
        .map(|p| crate::cpu_of(p.pid()))
        .sum();
    let requests = place.run(Spot::Hub, || {
        tracker
            .metrics_text()
            .lines()
            .filter(|l| l.starts_with("shoal_tracker_requests_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>()
    });
    let seeder_sent = place.run(Spot::Peer(0), || {
        seeder.metric("shoal_peer_uploaded_bytes_total")
    });
    let chunks = place.run(Spot::Hub, || chunk_count(tracker.addr, certs.as_ref()));
    let chunks = chunks.context("the tracker's locations reply has no chunk count")?;
    for (i, copy) in copies.iter().enumerate() {
        if digest_of(copy)? != digest {
            bail!("peer{}'s copy differs from the original", i + 1);
        }
    }
    Ok(Run {
        joins,
        done,
        cpu,
        seeder_sent,
        tracker_requests: Some(requests),
        piece: plan.size.div_ceil(chunks.max(1)),
    })
}

/// The number of chunks the tracker lists for [`FILE`], asked in its mode (clear or TLS).
fn chunk_count(tracker: SocketAddr, certs: Option<&common::Certs>) -> Option<u64> {
    let ask = format!(r#"{{"v":1,"msg":3,"file":"{FILE}"}}"#);
    let reply = match certs {
        None => common::Raw::connect(tracker).ask(&ask),
        Some(c) => {
            let mut client = common::tls_client(&c.path("ca.pem"), Some((c, "p0")), tracker);
            common::tls_ask(&mut client, &ask).ok()?
        }
    };
    reply["chunks"].as_u64()
}

fn outcome(
    name: &'static str,
    title: &'static str,
    caps: &str,
    skipped: Option<String>,
    measured: &[Measured],
) -> Outcome {
    let mut settings = vec![
        caps.to_string(),
        "T: from starting the first downloader until every copy is complete (then every copy's BLAKE3 is checked); T* = max_i (t_i + b_i), b_i = max(F/u_s, |P_i|·F/(u_s + Σ_{j∈P_i} u_j), F/d) for downloader i joining at t_i with P_i the downloaders joined by then (all at once: max(F/u_s, N·F/(u_s + Σ u_i)))".into(),
        "per peer: (done_i - t_i)/b_i, p50/p99/max; CPU: user + system seconds of every peer process (seeder included) per GiB delivered to the downloaders; seeder sent: bytes the seeder uploaded / F; tracker req/chunk: requests Shoal's tracker answered / chunks delivered".into(),
        "Shoal: every setting at its default but the cap; aria2c: same file, pieces of Shoal's chunk size, opentracker, DHT, LPD and PEX off, seeding on after completion".into(),
    ];
    settings.extend(skipped.clone());
    let mut rows = Vec::new();
    let mut data = Vec::new();
    let mut goals = Vec::new();
    for m in measured {
        let (row, plan) = (m.row, &m.plan);
        let [p50, p99, max] = m.shoal.own_ratios(plan);
        if let Some(Err(e)) = &m.bittorrent {
            settings.push(format!("aria2c failed, {}: {e}", row.label()));
        }
        let bt = m.bittorrent.as_ref().and_then(|r| r.as_ref().ok());
        let failed = matches!(m.bittorrent, Some(Err(_)));
        let or_dash = |f: &dyn Fn(&Run) -> String| {
            bt.map_or_else(|| if failed { "failed" } else { "-" }.to_string(), f)
        };
        rows.push(vec![
            row.n.to_string(),
            row.mib.to_string(),
            row.up.to_string(),
            row.variant.name().to_string(),
            format!("{:.2}", plan.bound(&plan.joins)),
            format!("{:.2}", m.shoal.time()),
            format!("{:.2}", m.shoal.ratio(plan)),
            or_dash(&|r| format!("{:.2}", r.time())),
            or_dash(&|r| format!("{:.2}", r.ratio(plan))),
            format!("{p50:.2} / {p99:.2} / {max:.2}"),
            or_dash(&|r| {
                let [p50, p99, max] = r.own_ratios(plan);
                format!("{p50:.2} / {p99:.2} / {max:.2}")
            }),
            format!("{:.2}", m.shoal.cpu_per_gib(plan)),
            or_dash(&|r| format!("{:.2}", r.cpu_per_gib(plan))),
            format!("{:.2}", m.shoal.seeder_copies(plan)),
            or_dash(&|r| format!("{:.2}", r.seeder_copies(plan))),
            m.shoal
                .requests_per_chunk(plan)
                .map_or("-".into(), |r| format!("{r:.2}")),
            format!("{}", m.shoal.piece / 1024),
        ]);
        data.push(json!({
            "downloaders": row.n, "file_bytes": plan.size, "upload_bytes_per_sec": plan.uploads,
            "download_bytes_per_sec": plan.download, "variant": row.variant.name(),
            "shoal": m.shoal.json(plan), "aria2c": bt.map(|r| r.json(plan)),
        }));
        goals.extend(row_goals(m));
    }
    Outcome {
        name,
        title,
        settings,
        table: Table {
            head: vec![
                "N",
                "F MiB",
                "U MiB/s",
                "variant",
                "T* s",
                "Shoal T s",
                "Shoal T/T*",
                "aria2c T s",
                "aria2c T/T*",
                "Shoal per peer p50/p99/max",
                "aria2c per peer p50/p99/max",
                "Shoal CPU s/GiB",
                "aria2c CPU s/GiB",
                "Shoal seeder sent",
                "aria2c seeder sent",
                "Shoal tracker req/chunk",
                "chunk KiB",
            ],
            rows,
        },
        goals,
        data: json!({ "skipped": skipped, "rows": data }),
    }
}

/// The goals of issue 16 that a row speaks to.
fn row_goals(m: &Measured) -> Vec<Goal> {
    let (row, plan, shoal) = (m.row, &m.plan, &m.shoal);
    let label = row.label();
    let ratio = shoal.ratio(plan);
    match row.variant {
        Variant::Joins => {
            let max = shoal.own_ratios(plan)[2];
            vec![Goal::new(
                format!("{label}: every peer's (done - join) ≤ 1.25·b_i (max {max:.2})"),
                max <= 1.25,
            )]
        }
        Variant::Uneven => {
            let copies = shoal.seeder_copies(plan);
            vec![
                Goal::new(format!("{label}: T ≤ 1.15·T* ({ratio:.2})"), ratio <= 1.15),
                Goal::new(
                    format!("{label}: the seeder sends ≤ 1.2 copies ({copies:.2})"),
                    copies <= 1.2,
                ),
            ]
        }
        Variant::Uniform | Variant::Download | Variant::Tls => {
            let slack = if row.n <= 64 { 1.15 } else { 1.25 };
            vec![Goal::new(
                format!("{label}: T ≤ {slack}·T* ({ratio:.2})"),
                ratio <= slack,
            )]
        }
    }
}
