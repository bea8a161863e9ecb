//! Crash consistency: a downloading `shoal-peer get` is killed with SIGKILL at many points, and
//! while it is down its hidden files are damaged in every way a crash, a restore or a human
//! could (truncated, extended, emptied, garbled, deleted, in any combination). Whatever
//! happens, the final name holds the exact file or nothing, and a last run completes it.

mod common;
use common::*;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NAME: &str = "crash.bin";
const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 32;
/// Kill-and-damage rounds at most, and the time they may take together.
const ROUNDS: usize = 40;
const ROUNDS_TIME: Duration = Duration::from_secs(35);
/// Fewer kills than this would not be "dozens".
const MIN_KILLS: usize = 24;

/// A small xorshift generator: the seed is printed, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.below(256) as u8).collect()
    }
}

/// Starts `shoal-peer get NAME` into `data`.
fn get(tracker: std::net::SocketAddr, data: &Path) -> Proc {
    let mut cmd = Command::new(PEER);
    cmd.args(["get", NAME]);
    daemon_env(&mut cmd, tracker, data, "d", &[]);
    Proc::spawn(cmd, "peer listening")
}

/// Chunks the bitmap claims (0 when it is missing or unreadable mid-rename).
fn claimed(data: &Path) -> usize {
    std::fs::read(data.join(format!(".{NAME}.shoal-have")))
        .map(|b| b.iter().map(|x| x.count_ones() as usize).sum())
        .unwrap_or(0)
}

/// Damages `path` in one of six ways (or leaves it); returns what it did.
fn damage(path: &Path, rng: &mut Rng) -> &'static str {
    let Ok(len) = std::fs::metadata(path).map(|m| m.len() as usize) else {
        return "absent";
    };
    let open = || OpenOptions::new().write(true).open(path).unwrap();
    match rng.below(6) {
        0 => "kept",
        1 => {
            open().set_len(rng.below(len) as u64).unwrap();
            "truncated"
        }
        2 => {
            let mut f = OpenOptions::new().append(true).open(path).unwrap();
            let more = rng.below(3 * CHUNK) + 1;
            f.write_all(&rng.bytes(more)).unwrap();
            "extended"
        }
        3 => {
            open().set_len(0).unwrap();
            "emptied"
        }
        4 => {
            let at = rng.below(len) as u64;
            let n = rng.below(64) + 1;
            open().write_all_at(&rng.bytes(n), at).unwrap();
            "garbled"
        }
        _ => {
            std::fs::remove_file(path).unwrap();
            "deleted"
        }
    }
}

/// The final name holds the exact file or nothing; a wrong file there fails the test.
fn assert_final_name_is_exact_or_absent(original: &Path, data: &Path, context: &str) {
    let target = data.join(NAME);
    if target.exists() {
        assert!(
            same_bytes(original, &target),
            "a wrong file carries the final name after {context}"
        );
    }
}

#[test]
fn a_download_killed_at_random_points_with_damaged_hidden_files_never_names_a_wrong_file() {
    let (tracker, _seeder, dir, original) = seeded(
        NAME,
        CHUNKS * CHUNK,
        77,
        &[("SHOAL_UPLOAD_LIMIT", "4194304")],
    );
    let data = dir.path().join("d");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("damage seed {seed}");
    let mut rng = Rng(seed);
    let (started, mut kills, mut completed) = (Instant::now(), 0, 0);
    for round in 0..ROUNDS {
        if started.elapsed() > ROUNDS_TIME {
            break;
        }
        let mut peer = get(tracker.addr, &data);
        let kill_at = rng.below(CHUNKS + 1);
        wait_until(Duration::from_secs(10), || {
            claimed(&data) >= kill_at || peer.child.try_wait().ok().flatten().is_some()
        });
        match peer.child.try_wait().unwrap() {
            Some(status) => {
                assert!(
                    status.success() || peer.log_contains("shoal-peer: "),
                    "round {round}: failed without a clear error:\n{}",
                    peer.log_text()
                );
            }
            None => {
                peer.kill9();
                kills += 1;
            }
        }
        let mut done = Vec::new();
        for kind in ["shoal-part", "shoal-meta", "shoal-have"] {
            let path = data.join(format!(".{NAME}.{kind}"));
            done.push(format!("{kind} {}", damage(&path, &mut rng)));
        }
        let context = format!("round {round} (seed {seed}, {})", done.join(", "));
        assert_final_name_is_exact_or_absent(&original, &data, &context);
        if data.join(NAME).exists() {
            completed += 1;
            std::fs::remove_file(data.join(NAME)).unwrap();
        }
    }
    assert!(kills >= MIN_KILLS, "only {kills} kills in {ROUNDS_TIME:?}");

    let mut last = get(tracker.addr, &data);
    let status = last.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()) && same_bytes(&original, &data.join(NAME)),
        "after {kills} kills ({completed} completed first), the last run failed:\n{}",
        last.log_text()
    );
    let mut left: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.retain(|n| n != NAME);
    assert!(left.is_empty(), "hidden files left behind: {left:?}");
}

/// A daemon downloading `NAME` is killed with SIGKILL once it holds some chunks; `damage` is
/// done to its data dir; a new daemon must then land the exact file. Returns that daemon's
/// log and the data dir's path.
fn daemon_restarted_after(seed: u64, damage: impl Fn(&Path)) -> (String, std::path::PathBuf) {
    let (tracker, _seeder, dir, original) = seeded(
        NAME,
        CHUNKS * CHUNK,
        seed,
        &[("SHOAL_UPLOAD_LIMIT", "1048576")],
    );
    let data = dir.path().join("d");
    let mut first = daemon(tracker.addr, &data, "d", &[("SHOAL_WANT", NAME)]);
    assert!(wait_until(Duration::from_secs(20), || claimed(&data) >= 4));
    first.kill9();
    assert!(!data.join(NAME).exists());
    damage(&data);

    let second = daemon(tracker.addr, &data, "d", &[("SHOAL_WANT", NAME)]);
    assert_lands(&original, &data.join(NAME), &second);
    (second.log_text(), data)
}

#[test]
fn a_daemon_starts_a_file_over_once_when_its_metadata_is_emptied_instead_of_retrying_for_ever() {
    let meta = |data: &Path| data.join(format!(".{NAME}.shoal-meta"));
    let (log, data) = daemon_restarted_after(78, |data| std::fs::write(meta(data), b"").unwrap());
    let starts_over: Vec<_> = log
        .lines()
        .filter(|l| l.contains("cannot be resumed"))
        .collect();
    assert_eq!(starts_over.len(), 1, "{log}");
    let path = meta(&data).display().to_string();
    assert!(starts_over[0].contains(&path), "{log}");
    assert!(!log.contains("download failed"), "{log}");
}

#[test]
fn a_daemon_cuts_a_partial_file_that_grew_while_it_was_down_and_lands_the_exact_file() {
    let (log, _) = daemon_restarted_after(79, |data| {
        let part = data.join(format!(".{NAME}.shoal-part"));
        let mut grown = OpenOptions::new().append(true).open(part).unwrap();
        grown.write_all(&[0x5a; 100_000]).unwrap();
    });
    assert!(log.contains("wrong length"), "{log}");
    assert!(log.contains("resuming partial download"), "{log}");
}
