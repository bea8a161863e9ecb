//! Several trackers: files spread by rendezvous hashing, reads that fail over, and trackers
//! killed, restarted empty or added while daemon peers swarm. Real binaries on loopback.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const FILE: &str = "data.bin";

/// A daemon that follows every tracker of `list` and wants `want`.
fn replica_daemon(list: &str, dir: PathBuf, name: &str, want: &str) -> Proc {
    let env = [
        ("SHOAL_TRACKER", list),
        ("SHOAL_TRACKER_REPLICAS", "2"),
        ("SHOAL_WANT", want),
        ("SHOAL_UPLOAD_LIMIT", "262144"),
    ];
    daemon("127.0.0.1:9".parse().unwrap(), &dir, name, &env)
}

fn names_set(addr: std::net::SocketAddr) -> BTreeSet<String> {
    file_names(addr).into_iter().collect()
}

/// Samples every peer's downloaded-chunk counter every 200 ms until each holds `original`;
/// returns the longest time any unfinished peer went without a new chunk, and the peers
/// still unfinished at `limit`.
fn longest_stall(
    peers: &[(Proc, PathBuf)],
    original: &std::path::Path,
    limit: Duration,
) -> (Duration, Vec<String>) {
    let start = Instant::now();
    let mut last = vec![(0.0, start); peers.len()];
    let mut done = vec![false; peers.len()];
    let mut worst = Duration::ZERO;
    while start.elapsed() < limit && done.iter().any(|d| !d) {
        let now = Instant::now();
        for (i, (p, dir)) in peers.iter().enumerate() {
            if done[i] {
                continue;
            }
            if same_bytes(original, &dir.join(FILE)) {
                done[i] = true;
                continue;
            }
            let chunks = metric_value(&p.metrics_text(), "shoal_peer_downloaded_chunks_total")
                .unwrap_or(0.0);
            if chunks > last[i].0 {
                last[i] = (chunks, now);
            }
            worst = worst.max(now - last[i].1);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let unfinished = peers
        .iter()
        .zip(&done)
        .filter(|(_, d)| !**d)
        .map(|((p, _), _)| p.log_text())
        .collect();
    (worst, unfinished)
}

#[test]
fn killing_one_of_three_trackers_mid_swarm_stalls_no_peer_and_it_is_refilled() {
    kill_the_first_owner_mid_swarm(3);
}

#[test]
fn killing_one_of_five_trackers_mid_swarm_stalls_no_peer_and_it_is_refilled() {
    kill_the_first_owner_mid_swarm(5);
}

/// `count` trackers, two owners per file, a dozen daemons swarming one file: the file's
/// first-ranked owner is killed mid-swarm, a peer joins afterwards, and the tracker is
/// restarted empty.
fn kill_the_first_owner_mid_swarm(count: usize) {
    let mut trackers = trackers(count, &[]);
    let list = tracker_list(&trackers);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("seed"), FILE, 2 * MIB, 17);
    let _seeder = replica_daemon(&list, dir.path().join("seed"), "seed", "");
    let ranking = owners_of(&trackers, FILE, count);
    let owners = &ranking[..2];
    assert!(wait_until(Duration::from_secs(10), || owners
        .iter()
        .all(|&i| holder_count(trackers[i].addr, FILE) == 1)));
    // The next in the file's ranking, which stands in while an owner is away.
    let spare = ranking[2];
    for i in &ranking[2..] {
        assert!(
            names_set(trackers[*i].addr).is_empty(),
            "only the file's owners index it"
        );
    }

    let peers: Vec<(Proc, PathBuf)> = (0..12)
        .map(|i| {
            let d = dir.path().join(format!("p{i}"));
            (replica_daemon(&list, d.clone(), &format!("p{i}"), FILE), d)
        })
        .collect();
    assert!(wait_until(Duration::from_secs(30), || peers
        .iter()
        .map(|(p, _)| p.metric("shoal_peer_downloaded_chunks_total"))
        .sum::<f64>()
        >= 24.0));
    // The file's first-ranked owner: every peer asked it first until now.
    let killed = owners[0];
    let killed_addr = trackers[killed].addr;
    trackers[killed].kill9();

    let late_dir = dir.path().join("late");
    let late = replica_daemon(&list, late_dir.clone(), "late", FILE);
    let (stall, unfinished) = longest_stall(&peers, &original, Duration::from_secs(90));
    eprintln!("longest stall of a peer after a tracker was killed: {stall:?}");
    assert!(unfinished.is_empty(), "{}", unfinished.join("\n---\n"));
    for (p, d) in &peers {
        assert_lands(&original, &d.join(FILE), p);
    }
    // A generous bound that still fails if a peer waited out a whole backoff or timeout.
    assert!(stall < Duration::from_secs(10), "a peer stalled {stall:?}");
    assert_lands(&original, &late_dir.join(FILE), &late);
    assert!(
        peers
            .iter()
            .any(|(p, _)| p.metric("shoal_peer_tracker_failovers_total") > 0.0),
        "reads moved to the second owner"
    );
    let sample = format!(
        r#"shoal_peer_tracker_requests_total{{outcome="unreachable",tracker="{killed_addr}"}}"#
    );
    assert!(peers
        .iter()
        .any(|(p, _)| metric_value(&p.metrics_text(), &sample).unwrap_or(0.0) > 0.0));

    assert!(
        wait_until(Duration::from_secs(10), || holder_count(
            trackers[spare].addr,
            FILE
        ) == 14),
        "the next tracker in the file's ranking stands in for the killed owner"
    );

    // Restarted empty, it is refilled by the peers' announces: every holder is back.
    let restarted = tracker_at(killed_addr, &[]);
    assert!(
        wait_until(Duration::from_secs(20), || holder_count(killed_addr, FILE)
            == 14),
        "holders on the restarted tracker: {}",
        holder_count(killed_addr, FILE)
    );
    assert_eq!(names_set(killed_addr), BTreeSet::from([FILE.to_string()]));
    assert_eq!(restarted.metric("shoal_tracker_files_owned"), 1.0);
    // The tracker that stood in for it meanwhile owns the file no more: the peers withdrew it.
    assert!(
        wait_until(Duration::from_secs(10), || holder_count(
            trackers[spare].addr,
            FILE
        ) == 0),
        "still listed by the stand-in: {} holders",
        holder_count(trackers[spare].addr, FILE)
    );
}

/// Names `count` small files in `dir` (`f00.bin`, ...), each with its own content.
fn many_files(dir: &std::path::Path, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let name = format!("f{i:02}.bin");
            make_file(dir, &name, 1000 + i, i as u64);
            name
        })
        .collect()
}

#[test]
fn files_whose_two_owners_died_are_listed_again_once_re_homed() {
    let mut trackers = trackers(3, &[]);
    let list = tracker_list(&trackers);
    let dir = tempfile::tempdir().unwrap();
    let names = many_files(&dir.path().join("seed"), 30);
    let _seeder = replica_daemon(&list, dir.path().join("seed"), "seed", "");
    for (i, t) in trackers.iter().enumerate() {
        let owned: BTreeSet<String> = names
            .iter()
            .filter(|n| owners_of(&trackers, n, 2).contains(&i))
            .cloned()
            .collect();
        assert!(
            wait_until(Duration::from_secs(10), || names_set(t.addr) == owned),
            "tracker {i} indexes exactly the files it owns"
        );
    }
    let kept = 2;
    let orphans = names
        .iter()
        .filter(|n| !owners_of(&trackers, n, 2).contains(&kept))
        .count();
    assert!(
        orphans > 0,
        "some files are owned by the two trackers killed"
    );
    trackers[0].kill9();
    trackers[1].kill9();

    // The seeder learns both are down on its next request to each (announces come every
    // second here) and registers their files with the tracker left.
    let all: BTreeSet<String> = names.iter().cloned().collect();
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || names_set(trackers[kept].addr)
            == all),
        "{} of 30 files listed",
        names_set(trackers[kept].addr).len()
    );
    eprintln!(
        "{orphans} orphaned files re-homed after {:?}",
        started.elapsed()
    );
    // A client that lists every tracker sees every file, two trackers down or not.
    let out = std::process::Command::new(PEER)
        .args(["files", "--json", "--tracker", &list])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 30);
}

#[test]
fn a_fourth_tracker_takes_only_its_share_and_old_owners_keep_theirs() {
    let mut trackers = trackers(3, &[]);
    let three = tracker_list(&trackers);
    let dir = tempfile::tempdir().unwrap();
    let names = many_files(&dir.path().join("seed"), 40);
    let mut seeder = replica_daemon(&three, dir.path().join("seed"), "seed", "");
    assert!(wait_until(Duration::from_secs(10), || trackers
        .iter()
        .all(|t| !file_names(t.addr).is_empty())));
    let before: Vec<BTreeSet<String>> = trackers.iter().map(|t| names_set(t.addr)).collect();

    trackers.push(tracker(&[]));
    let four = tracker_list(&trackers);
    seeder.signal("TERM");
    seeder.wait_exit(Duration::from_secs(10)).unwrap();
    let _seeder = replica_daemon(&four, dir.path().join("seed"), "seed", "");
    let owned = |i: usize| -> BTreeSet<String> {
        names
            .iter()
            .filter(|n| owners_of(&trackers, n, 2).contains(&i))
            .cloned()
            .collect()
    };
    assert!(wait_until(Duration::from_secs(10), || names_set(
        trackers[3].addr
    ) == owned(3)));
    let moved = owned(3).len();
    eprintln!("the fourth tracker took {moved} of 40 files");
    assert!(moved > 0 && moved < 40, "{moved} of 40 moved");
    for (i, had) in before.iter().enumerate() {
        let still = owned(i);
        assert!(
            still.is_subset(had),
            "tracker {i} gained files it did not own"
        );
        assert!(wait_until(Duration::from_secs(10), || still
            .is_subset(&names_set(trackers[i].addr))));
    }
}
