//! Scenario 1, swarm distribution: one seeder and N downloaders, every peer's upload capped at
//! U. The time until every copy is complete is compared with the lower bound
//! T* = max(F/U, N·F/(U + N·U)) (the seeder must send every byte once; all peers together
//! upload at most (N+1)·U) and with a central server's N·F/U. Every N runs twice: in clear
//! text, then with every connection in mutual TLS.

use crate::report::{Goal, Outcome, Table};
use crate::{
    common, digest_of, secs, start_peer, start_tracker, tls_settings, wait_for_files, Scale, MIB,
};
use anyhow::{bail, Context};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const FILE: &str = "swarm.bin";
const UPLOAD: u64 = 4 * MIB;
/// Goal: T ≤ 1.25 T*.
const SLACK: f64 = 1.25;

struct Round {
    n: usize,
    tls: bool,
    time: Duration,
    /// Bytes the seeder uploaded, in copies of the file.
    seeder_copies: f64,
    /// Bytes the downloaders uploaded to each other, as a share of what U allowed them in T.
    peer_upload_use: f64,
    duplicates: f64,
    dropped: f64,
}

pub fn run(scale: Scale) -> anyhow::Result<Outcome> {
    let sizes: &[usize] = scale.pick(&[1, 4], &[1, 4, 8, 16, 32]);
    let size = scale.pick(8 * MIB, 32 * MIB);
    let bound = Duration::from_secs_f64(size as f64 / UPLOAD as f64);
    let root = tempfile::tempdir()?;
    let original = common::make_file(&root.path().join("origin"), FILE, size as usize, 11);
    let digest = digest_of(&original)?;
    let certs = common::Certs::new(1);
    let mut rounds = Vec::new();
    for &n in sizes {
        for tls in [None, Some(&certs)] {
            let dir = root.path().join(format!("n{n}"));
            let round = distribute(n, &dir, &original, &digest, bound, tls)
                .with_context(|| format!("{n} downloaders, TLS {}", tls.is_some()))?;
            std::fs::remove_dir_all(&dir)?;
            rounds.push(round);
        }
    }
    Ok(outcome(size, bound, &rounds))
}

/// One seeder and `n` downloaders on a fresh tracker; returns when every copy is verified.
fn distribute(
    n: usize,
    dir: &Path,
    original: &Path,
    digest: &str,
    bound: Duration,
    tls: Option<&common::Certs>,
) -> anyhow::Result<Round> {
    let upload = UPLOAD.to_string();
    let tls_env = tls_settings(tls, "p0");
    let mut settings = vec![("SHOAL_UPLOAD_LIMIT", &*upload), ("SHOAL_WANT", FILE)];
    settings.extend(common::env_refs(&tls_env));
    let settings = &settings[..];
    let tracker = start_tracker(tls);
    let seed_dir = dir.join("seeder");
    std::fs::create_dir_all(&seed_dir)?;
    std::fs::hard_link(original, seed_dir.join(FILE))?;
    let seeder = start_peer(tracker.addr, &seed_dir, "seeder", settings);
    if !common::wait_until(Duration::from_secs(20), || {
        common::holder_count_in(tracker.addr, FILE, tls) == 1
    }) {
        bail!("the seeder did not register {FILE}");
    }
    let dirs: Vec<_> = (0..n).map(|i| dir.join(format!("peer{i}"))).collect();
    let started = Instant::now();
    let peers: Vec<common::Proc> = std::thread::scope(|s| {
        let spawned: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                s.spawn(move || start_peer(tracker.addr, d, &format!("peer{i}"), settings))
            })
            .collect();
        spawned
            .into_iter()
            .map(|h| h.join().expect("peer started"))
            .collect()
    });
    let copies: Vec<_> = dirs.iter().map(|d| d.join(FILE)).collect();
    let paths: Vec<&Path> = copies.iter().map(|p| p.as_path()).collect();
    let limit = bound * 8 + Duration::from_secs(30);
    let done = wait_for_files(&paths, started, limit);
    let Some(time) = done.iter().copied().collect::<Option<Vec<_>>>() else {
        let missing = done.iter().filter(|d| d.is_none()).count();
        bail!("{missing} of {n} copies incomplete after {limit:?}");
    };
    let time = time.into_iter().max().unwrap_or_default();
    for (i, copy) in copies.iter().enumerate() {
        if digest_of(copy)? != digest {
            bail!("peer{i}'s copy differs from the original");
        }
    }
    let sum = |metric: &str| peers.iter().map(|p| p.metric(metric)).sum::<f64>();
    let size = std::fs::metadata(original)?.len() as f64;
    let allowed = n as f64 * UPLOAD as f64 * time.as_secs_f64();
    Ok(Round {
        n,
        tls: tls.is_some(),
        time,
        seeder_copies: seeder.metric("shoal_peer_uploaded_bytes_total") / size,
        peer_upload_use: sum("shoal_peer_uploaded_bytes_total") / allowed,
        duplicates: sum("shoal_peer_duplicate_chunks_total"),
        dropped: sum("shoal_peer_holders_dropped_total"),
    })
}

fn outcome(size: u64, bound: Duration, rounds: &[Round]) -> Outcome {
    let upload = UPLOAD as f64;
    let rows = rounds
        .iter()
        .map(|r| {
            let central = r.n as f64 * size as f64 / upload;
            vec![
                r.n.to_string(),
                if r.tls { "mutual TLS" } else { "clear" }.to_string(),
                secs(r.time),
                secs(bound),
                format!("{:.2}", r.time.as_secs_f64() / bound.as_secs_f64()),
                format!("{central:.2}"),
                format!("{:.2}", r.time.as_secs_f64() / central),
                format!("{:.2}", r.seeder_copies),
                format!("{:.0} %", 100.0 * r.peer_upload_use),
                format!("{:.0}", r.duplicates),
                format!("{:.0}", r.dropped),
            ]
        })
        .collect();
    let ratio = |r: &Round| r.time.as_secs_f64() / bound.as_secs_f64();
    let worst = rounds.iter().map(ratio).fold(0.0, f64::max);
    let data: Vec<_> = rounds
        .iter()
        .map(|r| {
            json!({
                "downloaders": r.n, "tls": r.tls, "seconds": r.time.as_secs_f64(),
                "bound_seconds": bound.as_secs_f64(), "ratio_to_bound": ratio(r),
                "client_server_seconds": r.n as f64 * size as f64 / upload,
                "seeder_uploaded_copies": r.seeder_copies, "peer_upload_use": r.peer_upload_use,
                "duplicate_chunks": r.duplicates, "holders_dropped": r.dropped,
            })
        })
        .collect();
    Outcome {
        name: "swarm",
        title: "1. Swarm distribution",
        settings: vec![
            format!(
                "F = {} MiB, U = {} MiB/s on every peer (SHOAL_UPLOAD_LIMIT), every other setting at its default (chunk size chosen per file: {} KiB)",
                size / MIB,
                UPLOAD / MIB,
                shoal::chunking::auto_chunk_size(size) / 1024
            ),
            "T: from starting the N downloader processes together (seeder registered) until every copy is complete; then every copy's BLAKE3 is checked".into(),
            "connections: clear text, or mutual TLS on every connection (SHOAL_TLS_CERT/KEY/CA, rustls with ring, throwaway certificates) on a fresh tracker and peers".into(),
            "T* = max(F/U, N·F/(U + N·U)) = F/U; client-server = N·F/U; seeder sent = bytes the seeder uploaded / F; peer upload use = bytes the downloaders uploaded / (N·U·T)".into(),
        ],
        table: Table {
            head: vec![
                "N", "connections", "T s", "T* s", "T/T*", "client-server s", "T/client-server",
                "seeder sent (copies)", "peer upload use", "duplicate chunks", "holders dropped",
            ],
            rows,
        },
        goals: vec![Goal::new(
            format!("T ≤ {SLACK}·T* for every N, clear and TLS (worst T/T* = {worst:.2})"),
            worst <= SLACK,
        )],
        data: json!({ "file_bytes": size, "upload_bytes_per_sec": UPLOAD, "chunk_bytes": shoal::chunking::auto_chunk_size(size), "rounds": data }),
    }
}
